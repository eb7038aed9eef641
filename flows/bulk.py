"""Bulk generation: every row of a prompt dataset becomes a video and a manifest row.

    python -m flows.bulk --dataset prompts.jsonl --output outputs/run --model-path DIR \
        [--negative-prompt ... --height 480 --width 832 --num-frames 81 \
         --num-inference-steps 50 --guidance-scale 5 --seed 0] [run options]

Outputs: `<output>/videos/*.mp4`, `<output>/manifest.parquet` (one row per item),
checkpoints under `<output>/checkpoints/` (or `--checkpoint-store`), and with
`--training-data` a parquet of prompt embeddings and final latents under
`<output>/training/`. The run ends Failed if any item failed; run it again to redo
only what is missing. Dataset format and per-row options: `tasks.dataset`.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from typing import Any

from prefect import flow
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State

from fastvideo.fastvideo_args import SamplingParam
from flows.cli import add_options, given_options, local_path, prepare_environment, ui_hint
from flows.pipeline import encode_negative, process_window
from tasks.dataset import make_shards, plan_items
from tasks.denoise import DENOISE, DenoiseDispatch
from tasks.engine import prepare_run
from tasks.manifest import FAILED, failed_row, shard_rows, write_manifest, write_training_data
from tasks.reporting import DatasetProgress, publish_results
from tasks.stages import ENCODE_TEXT


@flow(name="bulk", log_prints=True)
def bulk(
    dataset: str,
    output: str,
    model_path: str,
    negative_prompt: str | None = None,
    height: int = 480,
    width: int = 832,
    num_frames: int = 81,
    num_inference_steps: int = 50,
    guidance_scale: float = 5.0,
    seed: int = 0,
    max_sequence_length: int = 512,
    shard_size: int = 1,
    concurrency: int = 1,
    checkpoint_every: int = 5,
    checkpoint_store: str | None = None,
    denoise_dispatch: str = "inprocess",
    nproc_per_node: int = 1,
    denoise_sp_size: int | None = None,
    denoise_deployment: str = "denoise-job/gpu-denoise",
    remote_launcher: str = "inprocess",
    device: str | None = None,
    dtype: str | None = None,
    denoise_device: str | None = None,
    denoise_dtype: str | None = None,
    fps: int = 16,
    training_data: bool = False,
    manifest_interval_s: float = 60.0,
    artifact_key: str | None = None,
) -> State:
    """Generate a video for every row of a prompt dataset; one manifest row per item.

    Args:
        dataset: parquet, JSONL or CSV (path or URI) with a `prompt` column; rows may set
            negative_prompt, seed, item_id and any sampling option.
        output: folder or s3://bucket/prefix for videos/, manifest.parquet, checkpoints/.
        model_path: Diffusers-format model folder (on every worker that runs a stage).
        negative_prompt: default negative prompt, embedded once per run.
        height: default video height in pixels.
        width: default video width in pixels.
        num_frames: default number of frames.
        num_inference_steps: default number of denoising steps.
        guidance_scale: default classifier-free guidance scale (<= 1 turns it off).
        seed: base of the per-item seeds of rows without one.
        max_sequence_length: text tokens per prompt.
        shard_size: items per task run (and per denoise job / GPU model load).
        concurrency: shards submitted together per stage (GPU jobs run side by side).
        checkpoint_every: denoising saves latents and scheduler state every this many steps.
        checkpoint_store: store URI for checkpoints; default the output.
        denoise_dispatch: inprocess, torchrun (this node) or deployment (GPU work pool).
        nproc_per_node: processes (GPUs) per denoise job under torchrun, here or on the
            GPU node (which then gets that many GPUs); the DiT runs sequence parallel.
        denoise_sp_size: processes per model replica in a denoise job (default all): with
            fewer, the job's processes form replicas that split its items.
        denoise_deployment: flow-name/deployment-name of the GPU denoise deployment.
        remote_launcher: how the GPU deployment runs a job: inprocess or torchrun.
        device: engine device; default cuda when available, else cpu.
        dtype: engine dtype; default bf16 on cuda, fp32 on cpu.
        denoise_device: device of the denoise jobs; default `device`, or cuda when they go
            to the GPU deployment.
        denoise_dtype: dtype of the denoise jobs; default bf16 on cuda, fp32 on cpu.
        fps: frames per second of the videos.
        training_data: also write prompt embeddings and final latents under training/.
        manifest_interval_s: rewrite the manifest at most this often during the run.
        artifact_key: lowercase-dashed key that versions the result artifacts across runs.
    """
    start = time.perf_counter()
    if artifact_key is not None and not re.fullmatch(r"[a-z0-9-]+", artifact_key):
        raise ValueError(f"artifact_key {artifact_key!r} may hold lowercase letters, digits "
                         "and dashes only")
    output = local_path(output)
    defaults = SamplingParam(negative_prompt=negative_prompt, height=height, width=width,
                             num_frames=num_frames, num_inference_steps=num_inference_steps,
                             guidance_scale=guidance_scale, seed=seed,
                             max_sequence_length=max_sequence_length)
    dispatch = DenoiseDispatch(mode=denoise_dispatch, nproc_per_node=nproc_per_node,
                               sp_size=denoise_sp_size, deployment=denoise_deployment,
                               remote_launcher=remote_launcher)
    plan = plan_items(local_path(dataset), output, defaults)
    ctx = prepare_run(model_path, local_path(checkpoint_store or output), output, defaults,
                      checkpoint_every=checkpoint_every, device=device, dtype=dtype, fps=fps,
                      denoise_device=denoise_device, denoise_dtype=denoise_dtype,
                      remote_denoise=denoise_dispatch == "deployment")
    rows: list[dict[str, Any]] = list(plan.carried) + [
        failed_row(i.item_id, i.prompt, i.error, flow_run.id) for i in plan.invalid]
    progress = DatasetProgress(total=plan.num_rows, done=len(rows),
                               description=f"Items of {dataset} done")
    negative = encode_negative(ctx)
    last_manifest = time.monotonic()
    shards = make_shards(plan.items, shard_size)
    for first in range(0, len(shards), max(concurrency, 1)):
        window = shards[first:first + max(concurrency, 1)]
        results = process_window(window, ctx, negative, dispatch)
        for i, shard in enumerate(window):
            rows += shard_rows(shard, {s: r[i] for s, r in results.items()}, flow_run.id)
            if training_data:
                write_training_data(shard, ctx, results[ENCODE_TEXT][i], results[DENOISE][i])
        progress.update(len(rows))
        if time.monotonic() - last_manifest > manifest_interval_s:
            write_manifest(rows, output)
            last_manifest = time.monotonic()
    manifest_uri = write_manifest(rows, output)
    seconds = time.perf_counter() - start
    publish_results(rows, len(plan.items), seconds, output, manifest_uri, artifact_key)
    failed = sum(r["status"] == FAILED for r in rows)
    summary = {"items": len(rows), "made": len(plan.items), "failed": failed,
               "output": output, "manifest": manifest_uri, "seconds": round(seconds, 2)}
    print(f"{len(rows) - failed}/{len(rows)} items succeeded; manifest: {manifest_uri}")
    if failed:
        return Failed(message=f"{failed} of {len(rows)} items failed; see {manifest_uri}",
                      data=summary)
    return Completed(message=f"{len(rows)} items succeeded", data=summary)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.bulk",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, help="parquet, JSONL or CSV file (path or URI)")
    parser.add_argument("--output", required=True, help="output folder or s3://bucket/prefix")
    parser.add_argument("--model-path", required=True, help="Diffusers-format model folder")
    parser.add_argument("--training-data", action="store_true",
                        help="also write prompt embeddings + final latents as parquet")
    parser.add_argument("--artifact-key", help="key that versions the result artifacts")
    add_options(parser)
    args = parser.parse_args(argv)
    prepare_environment()
    state = bulk(dataset=args.dataset, output=args.output, model_path=args.model_path,
                 training_data=args.training_data, artifact_key=args.artifact_key,
                 **given_options(args), return_state=True)
    summary = state.result(raise_on_failure=False)
    if isinstance(summary, dict):
        print(f"\nvideos:   {summary['output'].rstrip('/')}/videos/\n"
              f"manifest: {summary['manifest']}\n"
              f"{summary['items'] - summary['failed']}/{summary['items']} items succeeded "
              f"({summary['made']} made in this run, {summary['seconds']:.1f} s)")
    else:
        print(f"\nthe run ended {state.name}: {summary}", file=sys.stderr)
    print(ui_hint(state.state_details.flow_run_id))
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
