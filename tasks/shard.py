"""Placement `all`: a whole shard, every stage, on a warm worker (this node's or a GPU node's).

One task run per shard (`generate-shard-<n>`), which hands the shard to the worker and
turns its events into run logs (each item's stages, with times and checkpoint URIs) and
a progress artifact over denoising steps. Stage checkpoints are written by the worker
under the same keys as the one-task-per-stage path, so they stay the resume boundary:
a rerun skips what they hold. The task is not cached by Prefect: the worker
fingerprints the model (the flow's machine may not see it), and a rerun of a finished
item costs the worker a verified read of its checkpoints.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import task_run
from prefect.states import Failed, State

from fastvideo.jobs.engine import ENGINE
from fastvideo.jobs.items import (
    RunContext,
    Shard,
    failure,
    item_result_from_dict,
    run_context_from_dict,
    shard_from_dict,
    to_jsonable,
)
from fastvideo.jobs.shard_runner import ShardResults
from fastvideo.jobs.worker_client import WorkerSpec, call_worker, worker_spec_for
from fastvideo.storage import ObjectNotFoundError, retry_io
from tasks.common import (
    get_store,
    retry_on_store_unavailable,
    run_gpu_deployment,
    run_logger,
)
from tasks.dispatch import Dispatch
from tasks.progress import StepProgress

SHARD_TASK = "generate-shard"


def worker_spec(ctx: RunContext, dispatch: Dispatch, shard_index: int = 0) -> WorkerSpec:
    """The warm worker a shard goes to (`ctx` fingerprinted on this node): with N GPUs per
    node, replica `index % N`."""
    return worker_spec_for(ctx.model_path, ctx.device, ctx.dtype, ctx.options,
                           dispatch.nproc_per_node, shard_index, ctx.model_fingerprint)


def results_from_json(doc: dict[str, list[dict[str, Any]]]) -> ShardResults:
    """Per step of the pipeline (its phases, then the video), in order."""
    return {stage: [item_result_from_dict(r) for r in results] for stage, results in doc.items()}


def run_on_worker(ctx: RunContext, shard: Shard, dispatch: Dispatch) -> ShardResults:
    """Every stage of `shard` on this node's warm worker, with logs and a progress bar."""
    logger = run_logger()
    progress = StepProgress(len(shard.items), f"Denoising steps of {shard.label('shard')}")

    def on_event(event: dict[str, Any]) -> None:
        if event["event"] == "step":
            progress(event["item_id"], event["step"], event["total"])
            return
        result = item_result_from_dict(event["result"])
        if not result.ok:
            logger.error("%s item %s failed: %s", event["stage"], result.item_id, result.error)
        elif result.info.get("reused"):
            logger.info("%s item %s: reused -> %s", event["stage"], result.item_id,
                        result.ref.uri)
        else:
            logger.info("%s item %s: %.3f s -> %s", event["stage"], result.item_id,
                        result.seconds, result.ref.uri)

    ctx = ENGINE.with_fingerprint(ctx)  # here: this node runs the stages and sees the model
    spec = worker_spec(ctx, dispatch, shard.index)
    payload = call_worker(spec, {"kind": "shard", "ctx": to_jsonable(ctx),
                                 "shard": to_jsonable(shard)}, on_event,
                          idle_timeout_s=dispatch.worker_idle_timeout_s, on_wait=logger.info)
    return results_from_json(payload)


def shard_job_key(ctx: RunContext, shard: Shard) -> str:
    body = json.dumps(to_jsonable({"ctx": ctx, "shard": shard.items}), sort_keys=True)
    return f"jobs/shard/{hashlib.sha256(body.encode()).hexdigest()}/job.json"


def run_on_deployment(ctx: RunContext, shard: Shard, dispatch: Dispatch) -> ShardResults:
    """The shard as a flow run of the GPU deployment (`flows.gpu_shard`), which hands it
    to its node's warm worker; the job and its results travel through the store."""
    store = get_store(ctx.store_uri)
    key = shard_job_key(ctx, shard)
    retry_io(lambda: store.put_bytes(key, json.dumps(
        {"ctx": to_jsonable(ctx), "shard": to_jsonable(shard)}).encode()))
    parameters = {"store_uri": ctx.store_uri, "job_key": key,
                  "nproc_per_node": dispatch.nproc_per_node,
                  "worker_idle_timeout_s": dispatch.worker_idle_timeout_s}
    child = run_gpu_deployment(dispatch, parameters, key.split("/")[2])
    run_logger().info("GPU shard run %s ended %s", child.name, child.state.name)
    try:
        return results_from_json(json.loads(retry_io(lambda: store.get_bytes(result_key(key)))))
    except ObjectNotFoundError:
        error = f"GPU shard run {child.name} ended {child.state.name} without results"
        return {SHARD_TASK: [failure(i.item_id, SHARD_TASK, error) for i in shard.items]}


def result_key(job_key: str) -> str:
    return f"{job_key.rsplit('/', 1)[0]}/result.json"


def read_shard_job(store_uri: str, job_key: str) -> tuple[RunContext, Shard]:
    doc = json.loads(retry_io(lambda: get_store(store_uri).get_bytes(job_key)))
    return run_context_from_dict(doc["ctx"]), shard_from_dict(doc["shard"])


def _task_run_name() -> str:
    shard = task_run.parameters.get("shard")
    return shard.label("generate") if isinstance(shard, Shard) else SHARD_TASK


@task(name=SHARD_TASK, task_run_name=_task_run_name, cache_policy=NO_CACHE,
      persist_result=False, tags=["gpu"], retries=2, retry_delay_seconds=[2, 8],
      retry_condition_fn=retry_on_store_unavailable)
def generate_shard(shard: Shard, ctx: RunContext, dispatch: Dispatch) -> ShardResults | State:
    """Every stage for every item of `shard` on the run's warm worker; the task ends Failed
    (carrying the results) when an item failed."""
    if dispatch.mode == "deployment":
        results = run_on_deployment(ctx, shard, dispatch)
    else:
        results = run_on_worker(ctx, shard, dispatch)
    failed = [r for r in list(results.values())[-1] if not r.ok]
    if failed:
        return Failed(message=f"{len(failed)} of {len(shard.items)} item(s) failed; first: "
                              f"{failed[0].item_id} in {failed[0].failed_stage}: "
                              f"{failed[0].error}", data=results)
    return results
