"""Checkpoint write/read throughput, local folder and S3 (SeaweedFS on loopback).

    python benchmarks/bench_checkpoints.py --repeats 10
    python benchmarks/bench_checkpoints.py --no-s3          # local folder only

The batch is what travels between denoising and its neighbours at 480x832x81:
latents [1,16,21,60,104] fp32 plus prompt and negative embeddings [1,512,4096]
bf16 (about 16.8 MB). The baseline, in the same run, is a raw `put_bytes` /
`get_bytes` of one blob of the same size: the difference is the checkpoint's
cost (serialising, sha256 of every file, the manifest, verification on read).
Median of `--repeats`; each write goes to a fresh key, as new work does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

# Run as a script from anywhere: `tests.s3_server` lives at the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastvideo.forward_batch import ForwardBatch  # noqa: E402
from fastvideo.storage import ArtifactStore, open_store, read_checkpoint, write_checkpoint  # noqa: E402
from tests.s3_server import S3Server  # noqa: E402


def make_batch() -> ForwardBatch:
    g = torch.Generator().manual_seed(0)
    return ForwardBatch(
        prompt=["a fox running through fresh snow, cinematic"],
        negative_prompt=["blurry, low quality"],
        prompt_embeds=torch.randn(1, 512, 4096, generator=g).to(torch.bfloat16),
        negative_prompt_embeds=torch.randn(1, 512, 4096, generator=g).to(torch.bfloat16),
        latents=torch.randn(1, 16, 21, 60, 104, generator=g),
        timesteps=torch.linspace(999, 0, 50).to(torch.int64),
        step_index=25,
        extra={"scheduler_state": {"lower_order_nums": 2, "last_sample": None}},
    )


def median_s(fn: Callable[[int], object], repeats: int) -> float:
    fn(-1)  # warm-up (first S3 request opens the connection, first write creates folders)
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_store(name: str, store: ArtifactStore, batch: ForwardBatch, repeats: int) -> list[str]:
    num_bytes = sum(
        t.numel() * t.element_size()
        for t in (batch.latents, batch.prompt_embeds, batch.negative_prompt_embeds)
        if t is not None
    )
    blob = os.urandom(num_bytes)
    refs = {}

    def ckpt_write(i: int) -> None:
        refs[i] = write_checkpoint(store, f"bench/ckpt/{i}", batch)

    timings = {
        "raw put_bytes": median_s(lambda i: store.put_bytes(f"bench/raw/{i}", blob), repeats),
        "raw get_bytes": median_s(lambda i: store.get_bytes(f"bench/raw/{i}"), repeats),
        "write_checkpoint": median_s(ckpt_write, repeats),
        "read_checkpoint": median_s(lambda i: read_checkpoint(store, refs[i]), repeats),
    }
    mb = num_bytes / 1e6
    return [
        f"| {name:<6} | {op:<16} | {mb:7.1f} | {t * 1e3:9.1f} | {mb / t:8.0f} |"
        for op, t in timings.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-s3", action="store_true", help="skip the SeaweedFS S3 run")
    args = parser.parse_args()

    batch = make_batch()
    rows = [
        "| store  | operation        |      MB | median ms |     MB/s |",
        "|--------|------------------|---------|-----------|----------|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        rows += bench_store("local", open_store(tmp), batch, args.repeats)
    if not args.no_s3:
        with S3Server() as endpoint:
            os.environ.update(endpoint.env())
            bucket = endpoint.create_bucket("bench")
            rows += bench_store("s3", open_store(f"s3://{bucket}/run"), batch, args.repeats)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, repeats={args.repeats}")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
