"""The denoise task (placement `denoise`): a shard's items become one denoise job, run
where the run's `Dispatch` says.

* `inprocess`: in this process, with the engine's cached pipeline;
* `worker`: on this node's warm worker, which keeps the model loaded between jobs;
* `torchrun`: `torchrun --nproc-per-node N -m fastvideo.entrypoints.denoise_worker` on this
  node (the job and its outcomes travel through the store); with N > 1 the DiT runs
  sequence parallel over the N processes, rank 0 doing the store I/O;
* `deployment`: a flow run of the GPU denoise deployment (`flows.denoise_job`) on its own
  work pool, started with an idempotency key made of this flow run and the job's digest,
  so a retried parent attaches to the GPU run already going instead of starting another.

The job itself (`fastvideo.entrypoints.denoise_worker`) skips finished items and resumes
unfinished ones from their last progress checkpoint. With placement `all`, denoising is
one of the stages the warm worker runs (`tasks.shard`), not this task.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from collections import deque
from typing import Any

from prefect import Task, task
from prefect.runtime import task_run
from prefect.states import State

from fastvideo.entrypoints.denoise_worker import parse_progress
from fastvideo.jobs.denoise import (
    DenoiseJob,
    DenoiseOutcome,
    ProgressCallback,
    job_phase,
    result_key,
    run_denoise_job,
)
from fastvideo.jobs.engine import ENGINE
from fastvideo.jobs.item_phases import denoise_item, denoise_result, phase_inputs
from fastvideo.jobs.items import ItemResult, RunContext, Shard, failure
from fastvideo.jobs.worker_client import call_worker, worker_spec_for
from fastvideo.pipelines.phases import Phase
from fastvideo.storage import ArtifactStore, ObjectNotFoundError, retry_io
from tasks.common import (
    finish_shard,
    get_store,
    run_gpu_deployment,
    run_logger,
    stage_task,
)
from tasks.dispatch import Dispatch, Launcher, check_launcher
from tasks.progress import StepProgress


def job_key(job: DenoiseJob) -> str:
    return f"jobs/denoise/{job.digest}/job.json"


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
                on_progress: ProgressCallback, sp_size: int | None = None) -> list[DenoiseOutcome]:
    """Run a job here: in this process (with the engine's cached pipeline) or under
    torchrun (in replicas of `sp_size` processes). Either way the outcomes are also
    stored next to the job."""
    store = get_store(job.store_uri)
    key = job_key(job)
    if launcher == "torchrun":
        retry_io(lambda: store.put_bytes(key, job.to_json()))
        run_torchrun(store, key, nproc_per_node, on_progress, sp_size)
        return DenoiseOutcome.list_from_json(retry_io(lambda: store.get_bytes(result_key(key))))
    device = job.engine_args().device
    stages = job_phase(job.model_path).stages
    pipeline = ENGINE.options_pipeline(job.model_path, job.options, device, job.engine_args().dtype,
                            stages)
    with ENGINE.stage_lock(pipeline, stages):
        outcomes = run_denoise_job(job, pipeline, on_progress)
    retry_io(lambda: store.put_bytes(result_key(key), DenoiseOutcome.list_to_json(outcomes)))
    return outcomes


def execute_on_worker(job: DenoiseJob, dispatch: Dispatch, on_progress: ProgressCallback,
                      index: int = 0) -> list[DenoiseOutcome]:
    """Run a job on this node's warm worker for the job's model, options and device."""
    args = job.engine_args()
    spec = worker_spec_for(job.model_path, args.device, args.dtype, job.options,
                           dispatch.nproc_per_node, index)

    def on_event(event: dict) -> None:
        on_progress(event["item_id"], event["step"], event["total"])

    payload = call_worker(spec, {"kind": "denoise", "job": json.loads(job.to_json())},
                          on_event, idle_timeout_s=dispatch.worker_idle_timeout_s,
                          on_wait=run_logger().info)
    return DenoiseOutcome.list_from_json(json.dumps(payload).encode())


def run_remote(job: DenoiseJob, dispatch: Dispatch) -> list[DenoiseOutcome]:
    """Run a job as a flow run of the GPU deployment and read its outcomes from the store."""
    store = get_store(job.store_uri)
    key = job_key(job)
    retry_io(lambda: store.put_bytes(key, job.to_json()))
    parameters = {"store_uri": job.store_uri, "job_key": key,
                  "launcher": dispatch.remote_launcher,
                  "nproc_per_node": dispatch.nproc_per_node, "sp_size": dispatch.sp_size}
    child = run_gpu_deployment(dispatch, parameters, job.digest)
    run_logger().info("GPU denoise run %s ended %s", child.name, child.state.name)
    try:
        return DenoiseOutcome.list_from_json(retry_io(lambda: store.get_bytes(result_key(key))))
    except ObjectNotFoundError:
        error = f"GPU denoise run {child.name} ended {child.state.name} without outcomes"
        return [DenoiseOutcome(item.item_id, error=error) for item in job.items]


def _denoise(shard: Shard, ctx: RunContext, phases: tuple[Phase, ...], index: int,
             upstream: dict[str, list[ItemResult]], negative: ItemResult | None,
             dispatch: Dispatch) -> list[ItemResult] | State:
    """Denoise every item of the shard whose earlier phases succeeded, as one job."""
    phase = phases[index]
    results: list[ItemResult | None] = []
    job_items = []
    for i, item in enumerate(shard.items):
        earlier = {name: per_item[i] for name, per_item in upstream.items()}
        upstream_failure = next((r for r in earlier.values() if not r.ok), None)
        if upstream_failure is None:
            try:
                inputs = phase_inputs(phases, index, earlier, item, negative)
                job_items.append(denoise_item(ctx, phase, item.item_id, inputs))
            except ValueError as exc:
                upstream_failure = failure(item.item_id, phase.name, str(exc))
        results.append(upstream_failure)
    job = DenoiseJob(model_path=ctx.model_path, store_uri=ctx.store_uri, items=tuple(job_items),
                     checkpoint_every=ctx.checkpoint_every, device=ctx.denoise_device,
                     dtype=ctx.denoise_dtype, options=ctx.options)
    if job_items:
        if dispatch.mode == "deployment":
            outcomes = run_remote(job, dispatch)
        else:
            progress = StepProgress(len(job_items),
                                    f"Denoising steps of {shard.label(phase.name)}")
            if dispatch.mode == "worker":
                outcomes = execute_on_worker(job, dispatch, progress, shard.index)
            else:
                outcomes = execute_job(job, dispatch.mode, dispatch.nproc_per_node, progress,
                                       dispatch.sp_size)
        by_id = {o.item_id: denoise_result(phase, o) for o in outcomes}
        results = [r if r is not None else by_id[item.item_id]
                   for r, item in zip(results, shard.items)]
    for result in results:
        if result.ok and not result.info.get("reused"):
            run_logger().info("%s item %s: %.3f s (resumed from step %d) -> %s", phase.name,
                              result.item_id, result.seconds,
                              result.info["resumed_from_step"], result.ref.uri)
    return finish_shard(phase.name, results)


@functools.cache
def denoise_task(name: str) -> Task[..., Any]:
    """The task that runs the denoise phase `name` over a shard, as one denoise job."""
    return stage_task(name, tags=["denoise"])(_denoise)


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
    progress = StepProgress(len(job.items), f"Denoising steps of job {job.digest[:12]}")
    outcomes = execute_job(job, launcher, nproc_per_node, progress, sp_size=sp_size)
    return {"items": len(outcomes), "failed": sum(o.error is not None for o in outcomes),
            "skipped": sum(o.skipped for o in outcomes)}
