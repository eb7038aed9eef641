"""Per-item cost of the orchestration: the bulk flow against the engine called directly.

    python benchmarks/bench_orchestration.py --items 8
    python benchmarks/bench_orchestration.py --items 8 --no-s3

Both sides make the same videos (tiny random-weight Wan, CPU, the demo's 64x64x9 frames
and 10 steps) with the model already loaded: the baseline is `VideoGenerator.generate_video`
writing each mp4; the flow runs every stage as a Prefect task with a checkpoint after it
(and every `--checkpoint-every` denoising steps), a manifest, artifacts and logs. A
warm-up flow run first starts Prefect's embedded server (or uses PREFECT_API_URL) and
loads the pipeline, so neither is counted. The overhead per item is
(flow seconds - direct seconds) / items; as other processes may share the CPU, the
table also gives, from the same run, (flow wall seconds - the engine seconds the
manifest records) / items. A rerun over the same output with its manifest removed
shows the cost of a run whose every task is `Cached`. With S3, the flow writes to SeaweedFS on
loopback, and `bench_checkpoints.bench_store` gives the checkpoint throughput of a
480x832x81 denoise batch there, in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# Run as a script from anywhere: the repo root holds flows/, tasks/ and tests/.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402
from bench_checkpoints import bench_store, make_batch  # noqa: E402

from fastvideo import VideoGenerator  # noqa: E402
from fastvideo.storage import open_store  # noqa: E402
from fastvideo.testing.tiny_wan import make_tiny_wan  # noqa: E402
from flows.bulk import bulk  # noqa: E402
from tasks.manifest import MANIFEST_KEY, read_manifest  # noqa: E402
from tests.s3_server import S3Server  # noqa: E402

SAMPLING = dict(height=64, width=64, num_frames=9, num_inference_steps=10, guidance_scale=5.0)
PROMPTS = ["a cat walks across a sunny garden", "a red car drives along the coast at dusk",
           "waves crash on the rocks under a grey sky", "snow falls on a quiet forest",
           "a drone flies over green hills and a river", "a flower opens in the morning light",
           "a person rides a bicycle through the city at night", "rain on a window at dusk"]


def dataset(path: Path, items: int) -> Path:
    lines = [f'{{"prompt": "{PROMPTS[i % len(PROMPTS)]} #{i}", "seed": {i}}}' for i in range(items)]
    path.write_text("\n".join(lines) + "\n")
    return path


class Direct:
    """The baseline: one loaded `VideoGenerator`, each video generated and written in turn."""

    def __init__(self, model_path: Path) -> None:
        self.generator = VideoGenerator.from_pretrained(model_path, device="cpu")
        for seed in range(3):  # the first calls of a shape are slow (allocator, kernels)
            self.generator.generate_video("warm-up", negative_prompt="", seed=seed, **SAMPLING)

    def __call__(self, items: int, out: Path) -> float:
        start = time.perf_counter()
        for i in range(items):
            self.generator.generate_video(f"{PROMPTS[i % len(PROMPTS)]} #{i}", negative_prompt="",
                                          seed=i, output_path=out, **SAMPLING)
        return time.perf_counter() - start


def run_flow(data: Path, output: str, model_path: Path, **options: object) -> tuple[float, float]:
    """Wall seconds of a bulk run, and the engine seconds its manifest records."""
    start = time.perf_counter()
    state = bulk(dataset=str(data), output=output, model_path=str(model_path),
                 return_state=True, **SAMPLING, **options)
    seconds = time.perf_counter() - start
    if not state.is_completed():
        raise RuntimeError(f"bulk run ended {state.name}: {state.message}")
    rows = read_manifest(open_store(output))
    engine = sum(value or 0.0 for r in rows for key, value in r.items()
                 if key.endswith("_seconds"))
    return seconds, engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2,
                        help="interleaved repeats; the fastest of each is reported")
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--no-s3", action="store_true", help="skip the SeaweedFS runs")
    args = parser.parse_args()
    n = args.items
    results: dict[str, list[tuple[float, float]]] = {}
    throughput: list[str] = []

    with tempfile.TemporaryDirectory() as tmp_name, contextlib.ExitStack() as stack:
        tmp = Path(tmp_name)
        model = make_tiny_wan(tmp / "tiny-wan")
        data = dataset(tmp / "prompts.jsonl", n)
        direct = Direct(model)
        run_flow(dataset(tmp / "warm-up.jsonl", 1), str(tmp / "warm-up"), model)
        stores = {"local": str(tmp / "local")}
        if not args.no_s3:
            endpoint = stack.enter_context(S3Server())
            os.environ.update(endpoint.env())
            stores["S3"] = f"s3://{endpoint.create_bucket('bench')}"
        for r in range(args.repeats):
            seconds = direct(n, tmp / f"direct-{r}")
            results.setdefault("engine direct (baseline)", []).append((seconds, seconds))
            for store, root in stores.items():
                for shard_size in (1, n):
                    output = f"{root}/shard{shard_size}-{r}"
                    results.setdefault(f"flow, {store} store, shard size {shard_size}", []).append(
                        run_flow(data, output, model, shard_size=shard_size,
                                 checkpoint_every=args.checkpoint_every))
                # Same work again, manifest removed: every task is Cached.
                open_store(f"{root}/shard1-{r}").delete(MANIFEST_KEY)
                results.setdefault(f"flow rerun, {store} store, all Cached", []).append(
                    run_flow(data, f"{root}/shard1-{r}", model))
        if "S3" in stores:
            throughput = bench_store("s3", open_store(f"{stores['S3']}/ckpt"), make_batch(), 5)

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {n} items of "
          f"{SAMPLING['height']}x{SAMPLING['width']}x{SAMPLING['num_frames']}, "
          f"{SAMPLING['num_inference_steps']} steps, checkpoint every {args.checkpoint_every}, "
          f"fastest of {args.repeats}")
    base = min(s for s, _ in results.pop("engine direct (baseline)"))
    print("| run | wall s | s / item | vs direct, s / item | wall - engine, s / item |")
    print("|---|---|---|---|---|")
    print(f"| engine direct (baseline) | {base:.2f} | {base / n:.2f} | - | - |")
    for name, runs in results.items():
        wall, engine = min(runs)
        # A Cached run's manifest repeats the engine seconds of the run that did the work.
        own = "-" if "Cached" in name else f"{(wall - engine) / n:.2f}"
        print(f"| {name} | {wall:.2f} | {wall / n:.2f} | {(wall - base) / n:+.2f} | {own} |")
    if throughput:
        print("\nCheckpoint throughput to SeaweedFS S3 (480x832x81 denoise batch, median of 5):")
        print("| store  | operation        |      MB | median ms |     MB/s |")
        print("|--------|------------------|---------|-----------|----------|")
        print("\n".join(throughput))


if __name__ == "__main__":
    main()
