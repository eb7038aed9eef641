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

import sys

if __name__ == "__main__":
    # Before Prefect and the stages are imported (seconds): a warm worker's start-up is
    # the first video's critical path, so it starts first.
    from flows.cli import start_worker_from_argv

    start_worker_from_argv(sys.argv[1:])
    # Then Prefect's embedded server, whose start overlaps the imports below.
    from flows.embedded_server import start_early

    start_early()

import argparse
import re
import time
from typing import Any

from prefect import flow
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State

from flows.cli import (
    add_options,
    given_options,
    local_path,
    prepared_environment,
    run_settings,
    start_worker_early,
    ui_hint,
    worker_hint,
)
from flows.pipeline import run_shards
from tasks.dataset import make_shards, plan_items
from tasks.manifest import failed_row, shard_rows, write_manifest
from tasks.prepare import check_requests, prepare_run, request_defaults
from tasks.reporting import DatasetProgress, Tally, publish_results
from tasks.runs import bulk_run_name, output_key, take_over_output


@flow(name="bulk", flow_run_name=bulk_run_name, log_prints=True)
def bulk(
    dataset: str,
    output: str,
    model_path: str,
    negative_prompt: str | None = None,
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    max_sequence_length: int | None = None,
    image: str | None = None,
    embedded_guidance_scale: float | None = None,
    guidance_end: float | None = None,
    shard_size: int = 1,
    concurrency: int = 1,
    checkpoint_every: int = 5,
    checkpoint_store: str | None = None,
    dispatch: str = "inprocess",
    placement: str | None = None,
    nproc_per_node: int = 1,
    sp_size: int | None = None,
    deployment: str | None = None,
    remote_launcher: str = "inprocess",
    worker_idle_timeout_s: float = 1800.0,
    device: str | None = None,
    dtype: str | None = None,
    denoise_device: str | None = None,
    denoise_dtype: str | None = None,
    attention_backend: str | None = None,
    sta_config: str | None = None,
    enable_torch_compile: bool = False,
    batch_cfg: bool | None = None,
    vae_dtype: str = "float32",
    compile_cache_dir: str | None = None,
    step_cache_threshold: float | None = None,
    fps: int | None = None,
    training_data: bool = False,
    manifest_interval_s: float = 60.0,
    artifact_key: str | None = None,
    allow_unknown_columns: bool = False,
) -> State:
    """Generate a video for every row of a prompt dataset; one manifest row per item.

    Args:
        dataset: parquet, JSONL or CSV (path or URI) with a `prompt` column; rows may set
            negative_prompt, seed, item_id and any sampling option.
        output: folder or s3://bucket/prefix for videos/, manifest.parquet, checkpoints/.
        model_path: Diffusers-format model folder (on every worker that runs a stage).
        negative_prompt: default negative prompt, embedded once per run.
        height: default video height in pixels (unset: the model family's, 480 for Wan2.1;
            so for every sampling option below).
        width: default video width in pixels.
        num_frames: default number of frames.
        num_inference_steps: default number of denoising steps.
        guidance_scale: default classifier-free guidance scale (<= 1 turns it off).
        seed: base of the per-item seeds of rows without one.
        max_sequence_length: text tokens per prompt.
        image: image-to-video: the first frame (path or URI) for rows without an
            `image` column value.
        embedded_guidance_scale: guidance-distilled models (HunyuanVideo): the guidance
            the DiT takes as an input (unset: the family's).
        guidance_end: fraction of the denoising steps that use classifier-free guidance;
            later steps run the conditional branch alone (1.0: every step).
        shard_size: items per task run (and per denoise job / GPU model load).
        concurrency: shards in flight together (GPU jobs side by side); a warm worker also
            gets the next shards queued, so its GPU never waits between shards.
        checkpoint_every: denoising saves latents and scheduler state every this many steps.
        checkpoint_store: store URI for checkpoints; default the output.
        dispatch: where stages run: inprocess (this process), worker (this node's warm
            worker, which keeps the model loaded and compiled across shards and runs),
            torchrun (a torchrun job per shard on this node, denoising only) or deployment
            (the GPU work pool; its node's warm worker).
        placement: stages that go to the worker or GPU pool: all (default for worker and
            deployment: this machine then needs neither a GPU nor the weights) or denoise.
        nproc_per_node: processes (GPUs) per job on the target node: under torchrun the
            DiT runs sequence parallel over them; warm workers run one replica per GPU.
        sp_size: processes per model replica (default all): with fewer, the processes
            form replicas that split the items.
        deployment: flow-name/deployment-name of the GPU deployment (default
            gpu-shard/gpu-shard, or denoise-job/gpu-denoise with placement denoise).
        remote_launcher: how the gpu-denoise deployment runs a job: inprocess or torchrun.
        worker_idle_timeout_s: a warm worker exits after this long without work.
        device: engine device; default cuda when available (always on the GPU pool), else
            cpu.
        dtype: engine dtype; default bf16 on cuda, fp32 on cpu.
        denoise_device: with placement denoise, the device of denoising; default `device`,
            or cuda on the GPU pool.
        denoise_dtype: with placement denoise, the dtype of denoising.
        attention_backend: the DiT's attention backend by name (default: each layer's
            fastest on the device).
        sta_config: sliding tile attention windows, a JSON file on this machine (from
            `python -m fastvideo.entrypoints.sta_search`); selects SLIDING_TILE_ATTN.
        enable_torch_compile: compile the DiT's blocks (paid once per warm worker and
            video shape; see compile_cache_dir).
        batch_cfg: guidance's two DiT forwards as one batch of 2 (False: two forwards; None: a
            pair under sequence parallelism only).
        vae_dtype: dtype of the VAE decode.
        compile_cache_dir: where compiled kernels persist across processes, on the node
            running the stages (default PyTorch's folder under /tmp).
        step_cache_threshold: skip DiT steps whose modulated input changed little,
            TeaCache-style (larger skips more; default off; docs/attention_and_speed.md).
        fps: frames per second of the videos (default: the model family's, 16 for Wan2.1).
        training_data: also write prompt embeddings and final latents under training/.
        manifest_interval_s: rewrite the manifest at most this often during the run.
        artifact_key: lowercase-dashed key of the run's artifacts (default: one derived
            from the output), versioned across runs.
        allow_unknown_columns: ignore dataset columns that are no request option (else
            they fail the run at its start: a typo such as `guidance` would silently
            leave every row at the default).
    """
    start = time.perf_counter()
    if artifact_key is not None and not re.fullmatch(r"[a-z0-9-]+", artifact_key):
        raise ValueError(f"artifact_key {artifact_key!r} may hold lowercase letters, digits "
                         "and dashes only")
    output = local_path(output)
    lineage = take_over_output(output)
    run, options = run_settings(dispatch, placement, nproc_per_node, sp_size, deployment,
                                remote_launcher, worker_idle_timeout_s, attention_backend,
                                sta_config, enable_torch_compile, batch_cfg, vae_dtype,
                                compile_cache_dir, step_cache_threshold)
    # Options left unset take the model family's defaults (its pipeline's).
    defaults, family_fps = request_defaults(model_path, run, dict(
        negative_prompt=negative_prompt, height=height, width=width, num_frames=num_frames,
        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed,
        max_sequence_length=max_sequence_length, image=local_path(image) if image else None,
        embedded_guidance_scale=embedded_guidance_scale, guidance_end=guidance_end))
    fps = fps or family_fps
    plan = plan_items(local_path(dataset), output, defaults, allow_unknown_columns)
    ctx = prepare_run(model_path, local_path(checkpoint_store or output), output, defaults,
                      checkpoint_every=checkpoint_every, device=device, dtype=dtype, fps=fps,
                      denoise_device=denoise_device, denoise_dtype=denoise_dtype,
                      dispatch=run, options=options, training_data=training_data)
    check_requests(ctx, plan.items)
    rows: list[dict[str, Any]] = list(plan.carried) + [
        failed_row(i.item_id, i.prompt, i.error, flow_run.id, i.row) for i in plan.invalid]
    tally = Tally(total=len(rows) + len(plan.items), cached=len(plan.carried),
                  failed=len(plan.invalid))
    key = artifact_key or output_key(output)
    progress = DatasetProgress(tally, dataset, key)
    last_manifest = time.monotonic()
    made: dict[int, list[dict[str, Any]]] = {}  # by shard: shards end in any order

    def in_order() -> list[dict[str, Any]]:
        return rows + [row for index in sorted(made) for row in made[index]]

    for shard, results in run_shards(make_shards(plan.items, shard_size), ctx, run, concurrency):
        made[shard.index] = shard_rows(shard, results, flow_run.id)
        tally.count_shard(results)
        progress.update()
        if time.monotonic() - last_manifest > manifest_interval_s:
            write_manifest(in_order(), output)
            last_manifest = time.monotonic()
    rows = in_order()
    manifest_uri = write_manifest(rows, output)
    seconds = time.perf_counter() - start
    publish_results(rows, tally, seconds, output, manifest_uri, key, lineage)
    summary = {"items": tally.total, "succeeded": tally.succeeded, "made": tally.made,
               "cached": tally.cached, "failed": tally.failed, "output": output,
               "manifest": manifest_uri, "seconds": round(seconds, 2)}
    print(f"{tally.describe()}; manifest: {manifest_uri}")
    if tally.failed:
        return Failed(message=f"{tally.failed} of {tally.total} items failed; see "
                              f"{manifest_uri}", data=summary)
    return Completed(message=f"{len(rows)} items succeeded", data=summary)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.bulk",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, help="parquet, JSONL or CSV file (path or URI)")
    parser.add_argument("--output", required=True, help="output folder or s3://bucket/prefix")
    parser.add_argument("--model-path", required=True, help="Diffusers-format model folder")
    parser.add_argument("--training-data", action="store_true",
                        help="also write prompt embeddings + final latents as parquet")
    parser.add_argument("--artifact-key",
                        help="key of the run's artifacts (default: derived from --output)")
    parser.add_argument("--allow-unknown-columns", action="store_true",
                        help="ignore dataset columns that are no request option")
    add_options(parser)
    args = parser.parse_args(argv)
    start_worker_early(args.model_path, given_options(args))  # main(argv) callers
    with prepared_environment():
        state = bulk(dataset=args.dataset, output=args.output, model_path=args.model_path,
                     training_data=args.training_data, artifact_key=args.artifact_key,
                     allow_unknown_columns=args.allow_unknown_columns,
                     **given_options(args), return_state=True)
    summary = state.result(raise_on_failure=False)
    if isinstance(summary, dict):
        print(f"\nvideos:   {summary['output'].rstrip('/')}/videos/\n"
              f"manifest: {summary['manifest']}\n"
              f"{summary['succeeded']}/{summary['items']} items succeeded "
              f"({summary['made']} made in this run, {summary['cached']} cached from "
              f"earlier runs), {summary['failed']} failed ({summary['seconds']:.1f} s)")
    else:
        print(f"\nthe run ended {state.name}: {summary}", file=sys.stderr)
    print(ui_hint(state.state_details.flow_run_id))
    hint = worker_hint(given_options(args))
    if hint:
        print(hint)
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
