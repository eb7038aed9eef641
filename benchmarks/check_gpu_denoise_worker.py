"""The orchestration's denoise job on N GPUs (torchrun, NCCL, rank 0 doing the store I/O)
against the same job in one process, on a tiny checkpoint built here.

    python benchmarks/check_gpu_denoise_worker.py --nproc 2 --json-out result.json
    python benchmarks/check_gpu_denoise_worker.py --device cpu --dtype fp32   # CPU, gloo

The inputs (prompt and negative embeddings, timesteps, initial latents) are made by the
engine's own stages and written to a local store as checkpoints, as the bulk flow's
encode-text and prepare-latents tasks write them; the job then runs twice: in this process,
and as `torchrun --nproc-per-node N -m fastvideo.entrypoints.denoise_worker`, which reads
the job and its inputs from the store and writes the denoised latents and `result.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.forward_batch import ForwardBatch
from fastvideo.jobs.denoise import (
    DenoiseItem,
    DenoiseJob,
    DenoiseOutcome,
    result_key,
    run_denoise_job,
)
from fastvideo.pipelines.builder import build_pipeline_for_stages
from fastvideo.storage import CheckpointRef, open_store, read_checkpoint, write_checkpoint
from fastvideo.testing.tiny_wan import make_tiny_wan

PREPARE = ("input_validation_stage", "text_encoding_stage", "timestep_preparation_stage",
           "latent_preparation_stage")
PROMPTS = ("a red fox running through fresh snow", "a paper boat on a rainy street")
SAMPLING = dict(height=64, width=96, num_frames=9, num_inference_steps=8, guidance_scale=5.0)


def write_inputs(path: Path, store_uri: str, device: str, dtype: str) -> list[CheckpointRef]:
    """Each prompt's denoise input, as one checkpoint."""
    args = FastVideoArgs(model_path=str(path), device=device, dtype=dtype)
    pipeline = build_pipeline_for_stages(args, PREPARE)
    store = open_store(store_uri)
    refs = []
    for index, prompt in enumerate(PROMPTS):
        batch = ForwardBatch(prompt=[prompt], negative_prompt=["blurry"], seed=index,
                             request_id=f"item{index}", **SAMPLING)
        with torch.no_grad():
            for name in PREPARE:
                batch = pipeline.get_stage(name)(batch, args)
        fields = (*ForwardBatch.request_field_names(), "prompt_embeds", "negative_prompt_embeds",
                  "timesteps", "latents", "step_index")
        refs.append(write_checkpoint(store, f"inputs/item{index}", batch, fields))
    return refs


def job_items(refs: list[CheckpointRef], run: str) -> tuple[DenoiseItem, ...]:
    """One item per input, its output and progress under `run/`."""
    return tuple(DenoiseItem(f"item{i}", (ref,), f"{run}/out/item{i}", f"{run}/progress/item{i}")
                 for i, ref in enumerate(refs))


def latents_of(store_uri: str, outcomes: list[DenoiseOutcome]) -> dict[str, torch.Tensor]:
    store = open_store(store_uri)
    bad = [o for o in outcomes if o.ref is None]
    if bad:
        raise RuntimeError(f"denoising failed: {[(o.item_id, o.error) for o in bad]}")
    return {o.item_id: read_checkpoint(store, o.ref).latents.float() for o in outcomes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    dtype = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}.get(args.dtype, args.dtype)
    result: dict = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                    "dtype": dtype, "nproc": args.nproc, "sampling": SAMPLING}
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_wan(Path(tmp) / "tiny-wan")
        store_uri = str(Path(tmp) / "store")
        refs = write_inputs(path, store_uri, args.device, dtype)

        job = DenoiseJob(model_path=str(path), store_uri=store_uri,
                         items=job_items(refs, "inprocess"), checkpoint_every=3,
                         device=args.device, dtype=dtype)
        start = time.perf_counter()
        expected = latents_of(store_uri, run_denoise_job(job))
        result["inprocess_s"] = time.perf_counter() - start

        job = DenoiseJob(model_path=str(path), store_uri=store_uri,
                         items=job_items(refs, "torchrun"), checkpoint_every=3,
                         device=args.device, dtype=dtype)
        open_store(store_uri).put_bytes("jobs/job.json", job.to_json())
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
             "-m", "fastvideo.entrypoints.denoise_worker", "--store", store_uri,
             "--job-key", "jobs/job.json"],
            capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        result["torchrun_s"] = time.perf_counter() - start
        progress = [line for line in proc.stdout.splitlines()
                    if line.startswith("fastvideo-progress")]
        if proc.returncode:
            print(proc.stdout[-3000:], proc.stderr[-6000:], sep="\n")
            raise SystemExit(f"torchrun exited {proc.returncode}")
        outcomes = DenoiseOutcome.list_from_json(
            open_store(store_uri).get_bytes(result_key("jobs/job.json")))
        actual = latents_of(store_uri, outcomes)

    result["progress_lines"] = len(progress)
    result["items"] = {
        item_id: {"max_abs_diff": (actual[item_id] - ref).abs().max().item(),
                  "rel_l2": ((actual[item_id] - ref).norm() / ref.norm()).item()}
        for item_id, ref in expected.items()}
    print(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
