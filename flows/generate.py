"""Generate one video: the bulk pipeline's stages for a single request, with checkpoints.

    python -m flows.generate --prompt "a red fox in the snow" --output outputs/one \
        --model-path DIR [sampling options as in `fastvideo generate`] [run options]
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

from prefect import flow
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State

from fastvideo.jobs.items import Shard
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
from tasks.dataset import parse_rows
from tasks.manifest import SUCCEEDED, shard_rows
from tasks.prepare import check_requests, prepare_run, request_defaults
from tasks.runs import generate_run_name, take_over_output


@flow(name="generate", flow_run_name=generate_run_name, log_prints=True)
def generate(
    prompt: str,
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
) -> State:
    """Generate one video for `prompt` into `<output>/videos/`; the result is its manifest row.

    The options are the bulk flow's (`python -m flows.bulk --help` or `flows.bulk.bulk`).
    """
    output = local_path(output)
    take_over_output(output)
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
    items, invalid = parse_rows([{"prompt": prompt, "seed": seed}], defaults)
    if invalid:
        return Failed(message=invalid[0].error)
    ctx = prepare_run(model_path, local_path(checkpoint_store or output), output, defaults,
                      checkpoint_every=checkpoint_every, device=device, dtype=dtype, fps=fps,
                      denoise_device=denoise_device, denoise_dtype=denoise_dtype,
                      dispatch=run, options=options)
    check_requests(ctx, items)
    shard = Shard(index=0, items=tuple(items))
    ((_, by_stage),) = run_shards([shard], ctx, run, concurrency=1)
    row = shard_rows(shard, by_stage, flow_run.id)[0]
    if row["status"] != SUCCEEDED:
        return Failed(message=f"{row['failed_stage']}: {row['error']}", data=row)
    print(f"video: {row['video_uri']}")
    return Completed(message=row["video_uri"], data=row)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.generate",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--output", required=True, help="output folder or s3://bucket/prefix")
    parser.add_argument("--model-path", required=True, help="Diffusers-format model folder")
    add_options(parser)
    args = parser.parse_args(argv)
    options = {k: v for k, v in given_options(args).items() if k not in ("shard_size", "concurrency")}
    start_worker_early(args.model_path, options)  # main(argv) callers
    with prepared_environment():
        state = generate(prompt=args.prompt, output=args.output, model_path=args.model_path,
                         **options, return_state=True)
    row = state.result(raise_on_failure=False)
    if isinstance(row, dict) and row.get("video_uri"):
        print(f"\nvideo: {row['video_uri']}\ncheckpoints: {row['denoise_checkpoint_uri']} ...")
    else:
        print(f"\nthe run ended {state.name}: {state.message}", file=sys.stderr)
    print(ui_hint(state.state_details.flow_run_id))
    hint = worker_hint(options)
    if hint:
        print(hint)
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
