"""The denoise task: a shard of items becomes one denoise job, run where configuration says.

* `inprocess`: in this process, with the pipeline it already holds;
* `torchrun`: `torchrun --nproc-per-node N -m fastvideo.entrypoints.denoise_worker` on this
  node (the job and its outcomes travel through the store); with N > 1 the DiT runs
  sequence parallel over the N processes, rank 0 doing the store I/O;
* `deployment`: a flow run of the GPU denoise deployment (`flows.denoise_job`) on its own
  work pool, started with an idempotency key made of this flow run and the job's digest,
  so a retried parent attaches to the GPU run already going instead of starting another.

The job itself (`fastvideo.entrypoints.denoise_worker`) skips finished items and resumes
unfinished ones from their last progress checkpoint.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Literal

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.deployments import run_deployment
from prefect.exceptions import MissingContextError
from prefect.runtime import flow_run, task_run
from prefect.states import State

from fastvideo.entrypoints.denoise_worker import (
    DENOISING_STAGE,
    DenoiseItem,
    DenoiseJob,
    DenoiseOutcome,
    ProgressCallback,
    check_sp_size,
    parse_progress,
    result_key,
    run_denoise_job,
)
from fastvideo.storage import ArtifactStore, ObjectNotFoundError, retry_io
from tasks.common import finish_shard, get_store, run_logger, stage_task
from tasks.engine import ENGINE_LOCK, get_pipeline
from tasks.items import ItemResult, RunContext, Shard, combined_digest, failure
from tasks.stages import stage_key

DENOISE = "denoise"
DENOISE_PROGRESS = "denoise-progress"
Launcher = Literal["inprocess", "torchrun"]
GPU_COUNT_VARIABLE = "gpu_count"
"""The GPU work pool's job variable for the GPUs of one job (infra/k8s/gpu-job-template.json)."""


@dataclass(frozen=True)
class DenoiseDispatch:
    """Where denoise jobs run. Not part of any cache key: the result does not depend on it."""

    mode: Literal["inprocess", "torchrun", "deployment"] = "inprocess"
    nproc_per_node: int = 1
    """Processes (GPUs) of a denoise job under torchrun, here or on the GPU node in
    `deployment` mode, where the GPU run also asks its infrastructure for that many GPUs
    (job variable `gpu_count`). The DiT runs sequence parallel over them."""
    sp_size: int | None = None
    """Processes per model replica (default: all `nproc_per_node`); with fewer, the job's
    processes form replicas that split its items (many videos sooner, each one later)."""
    deployment: str = "denoise-job/gpu-denoise"
    """`flow-name/deployment-name` of the GPU denoise deployment."""
    remote_launcher: Launcher = "inprocess"
    """How the GPU deployment runs the job on its node."""
    timeout_s: float | None = None
    """How long to wait for a GPU run (None: as long as it takes)."""

    def __post_init__(self) -> None:
        if self.mode not in ("inprocess", "torchrun", "deployment"):
            raise ValueError(f"denoise dispatch mode must be inprocess, torchrun or deployment, "
                             f"got {self.mode!r}")
        if self.remote_launcher not in ("inprocess", "torchrun"):
            raise ValueError(f"remote_launcher must be inprocess or torchrun, "
                             f"got {self.remote_launcher!r}")
        check_launcher(self.mode if self.mode != "deployment" else self.remote_launcher,
                       self.nproc_per_node, self.sp_size)


def check_launcher(launcher: Launcher, nproc_per_node: int, sp_size: int | None = None) -> None:
    """ValueError unless `launcher` can run `nproc_per_node` processes in replicas of
    `sp_size`."""
    if nproc_per_node < 1:
        raise ValueError(f"nproc_per_node must be >= 1, got {nproc_per_node}")
    check_sp_size(nproc_per_node, sp_size)
    if nproc_per_node > 1 and launcher != "torchrun":
        raise ValueError(
            f"nproc_per_node={nproc_per_node} needs torchrun: --denoise-dispatch torchrun, or "
            f"--denoise-dispatch deployment with --remote-launcher torchrun (got {launcher})")


def job_key(job: DenoiseJob) -> str:
    return f"jobs/denoise/{job.digest}/job.json"


class _StepProgress:
    """A Prefect progress artifact over a job's denoising steps, updated at most once a second.

    Each item counts equally: an item at step s of n contributes s/n of its share.
    """

    def __init__(self, num_items: int, description: str) -> None:
        self.num_items = max(num_items, 1)
        self.fraction_done: dict[str, float] = {}
        self.last_update = 0.0
        try:
            self.artifact_id = create_progress_artifact(0.0, description=description)
        except MissingContextError:  # called outside a run (e.g. `.fn()` in a test)
            self.artifact_id = None

    def __call__(self, item_id: str, step: int, total: int) -> None:
        self.fraction_done[item_id] = step / total
        now = time.monotonic()
        if self.artifact_id is None or (now - self.last_update < 1.0 and step < total):
            return
        self.last_update = now
        percent = 100.0 * sum(self.fraction_done.values()) / self.num_items
        update_progress_artifact(self.artifact_id, min(percent, 100.0))


def run_torchrun(store: ArtifactStore, key: str, nproc_per_node: int,
                 on_progress: ProgressCallback, sp_size: int | None = None) -> None:
    """Run the worker under torchrun on this node; its log lines go to the run logger."""
    logger = run_logger()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc_per_node}", "-m", "fastvideo.entrypoints.denoise_worker",
           "--store", store.root_uri, "--job-key", key]
    if sp_size is not None:
        cmd += ["--sp-size", str(sp_size)]
    logger.info("starting %s", " ".join(cmd))
    tail: deque[str] = deque(maxlen=20)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            progress = parse_progress(line)
            if progress is not None:
                on_progress(*progress)
                continue
            tail.append(line)
            logger.info("[denoise worker] %s", line)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun denoise worker exited with {proc.returncode}: "
                           + " | ".join(tail))


def execute_job(job: DenoiseJob, launcher: Launcher, nproc_per_node: int,
                on_progress: ProgressCallback, ctx: RunContext | None = None,
                sp_size: int | None = None) -> list[DenoiseOutcome]:
    """Run a job here: in this process (reusing the run's pipeline when `ctx` is given)
    or under torchrun (in replicas of `sp_size` processes). Either way the outcomes are
    also stored next to the job."""
    store = get_store(job.store_uri)
    key = job_key(job)
    if launcher == "torchrun":
        retry_io(lambda: store.put_bytes(key, job.to_json()))
        run_torchrun(store, key, nproc_per_node, on_progress, sp_size)
        return DenoiseOutcome.list_from_json(retry_io(lambda: store.get_bytes(result_key(key))))
    # The run's pipeline serves only if denoising runs on the same device and dtype.
    reuse = ctx is not None and (ctx.denoise_device, ctx.denoise_dtype) == (ctx.device, ctx.dtype)
    with ENGINE_LOCK:
        pipeline = get_pipeline(ctx, [DENOISING_STAGE]) if reuse else None
        outcomes = run_denoise_job(job, pipeline, on_progress)
    retry_io(lambda: store.put_bytes(result_key(key), DenoiseOutcome.list_to_json(outcomes)))
    return outcomes


def run_remote(job: DenoiseJob, dispatch: DenoiseDispatch) -> list[DenoiseOutcome]:
    """Run a job as a flow run of the GPU deployment and read its outcomes from the store."""
    store = get_store(job.store_uri)
    key = job_key(job)
    retry_io(lambda: store.put_bytes(key, job.to_json()))
    parameters = {"store_uri": job.store_uri, "job_key": key,
                  "launcher": dispatch.remote_launcher,
                  "nproc_per_node": dispatch.nproc_per_node, "sp_size": dispatch.sp_size}
    # The GPU job's size is fixed before it starts (the Kubernetes template requests
    # `gpu_count` GPUs; a process worker ignores the variable).
    job_variables = {GPU_COUNT_VARIABLE: dispatch.nproc_per_node}
    idempotency_key = f"{flow_run.id}-{job.digest}"
    started = datetime.now(timezone.utc)
    child = run_deployment(dispatch.deployment, parameters=parameters,
                           job_variables=job_variables, idempotency_key=idempotency_key,
                           timeout=dispatch.timeout_s)
    if not child.state.is_completed() and child.created < started:
        # A run from before this attempt that failed: start one more, deterministically named.
        child = run_deployment(dispatch.deployment, parameters=parameters,
                               job_variables=job_variables,
                               idempotency_key=f"{idempotency_key}-after-{child.id}",
                               timeout=dispatch.timeout_s)
    run_logger().info("GPU denoise run %s ended %s", child.name, child.state.name)
    try:
        return DenoiseOutcome.list_from_json(retry_io(lambda: store.get_bytes(result_key(key))))
    except ObjectNotFoundError:
        error = f"GPU denoise run {child.name} ended {child.state.name} without outcomes"
        return [DenoiseOutcome(item.item_id, error=error) for item in job.items]


def _job_item(ctx: RunContext, item_id: str, inputs: list) -> DenoiseItem:
    output_key = stage_key(ctx, DENOISE, {}, combined_digest(inputs),
                           engine=(ctx.denoise_device, ctx.denoise_dtype))
    # The same hash under another stage folder: the progress of exactly that output.
    progress_key = output_key.replace(f"/{DENOISE}/", f"/{DENOISE_PROGRESS}/", 1)
    return DenoiseItem(item_id=item_id, inputs=tuple(inputs), output_key=output_key,
                       progress_key=progress_key)


def _result(outcome: DenoiseOutcome) -> ItemResult:
    if outcome.error is not None:
        return failure(outcome.item_id, DENOISE, outcome.error, outcome.corrupt_input)
    return ItemResult(outcome.item_id, ref=outcome.ref, seconds=outcome.seconds,
                      info={"reused": outcome.skipped,
                            "resumed_from_step": outcome.resumed_from_step})


@stage_task(DENOISE, tags=["denoise"])
def denoise(shard: Shard, ctx: RunContext, negative: ItemResult | None, text: list[ItemResult],
            latents: list[ItemResult], dispatch: DenoiseDispatch) -> list[ItemResult] | State:
    """Denoise every item of the shard whose text and latents are ready, as one job."""
    results: list[ItemResult | None] = []
    job_items: list[DenoiseItem] = []
    for item, text_result, latents_result in zip(shard.items, text, latents, strict=True):
        upstream_failure = next((r for r in (text_result, latents_result) if not r.ok), None)
        results.append(upstream_failure)
        if upstream_failure is None:
            inputs = [text_result.ref, latents_result.ref]
            if item.guidance_scale > 1.0 and item.shared_negative:
                inputs.append(negative.ref)
            job_items.append(_job_item(ctx, item.item_id, inputs))
    job = DenoiseJob(model_path=ctx.model_path, store_uri=ctx.store_uri, items=tuple(job_items),
                     checkpoint_every=ctx.checkpoint_every, device=ctx.denoise_device,
                     dtype=ctx.denoise_dtype)
    if job_items:
        if dispatch.mode == "deployment":
            outcomes = run_remote(job, dispatch)
        else:
            progress = _StepProgress(len(job_items), f"Denoising steps of {shard.label(DENOISE)}")
            outcomes = execute_job(job, dispatch.mode, dispatch.nproc_per_node, progress, ctx,
                                   dispatch.sp_size)
        by_id = {o.item_id: _result(o) for o in outcomes}
        results = [r if r is not None else by_id[item.item_id]
                   for r, item in zip(results, shard.items)]
    for result in results:
        if result.ok and not result.info.get("reused"):
            run_logger().info("denoise item %s: %.3f s (resumed from step %d) -> %s",
                              result.item_id, result.seconds,
                              result.info["resumed_from_step"], result.ref.uri)
    return finish_shard(DENOISE, results)


def _job_run_name() -> str:
    return f"denoise-job-{task_run.parameters['job_key'].split('/')[-2][:12]}"


@task(name="run-denoise-job", task_run_name=_job_run_name)
def run_denoise_job_task(store_uri: str, job_key: str, launcher: Launcher = "inprocess",
                         nproc_per_node: int = 1, sp_size: int | None = None
                         ) -> dict[str, int]:
    """Run a stored denoise job on this node (the GPU deployment's one task)."""
    check_launcher(launcher, nproc_per_node, sp_size)
    store = get_store(store_uri)
    job = DenoiseJob.from_json(retry_io(lambda: store.get_bytes(job_key)))
    progress = _StepProgress(len(job.items), f"Denoising steps of job {job.digest[:12]}")
    outcomes = execute_job(job, launcher, nproc_per_node, progress, sp_size=sp_size)
    return {"items": len(outcomes), "failed": sum(o.error is not None for o in outcomes),
            "skipped": sum(o.skipped for o in outcomes)}
