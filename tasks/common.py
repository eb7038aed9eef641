"""What every stage task shares: its Prefect options, its cache key, and the per-item loop.

* **Cache key** from the task's inputs only (the shard's item specs, the run context, the
  upstream references with their digests), never the flow run: a retried or re-started
  run finds finished stages `Cached`. A shard with a failed item ends `Failed` (carrying
  its results), so it is never cached and a rerun redoes it, reusing from the store
  whatever its items had finished.
* **Retries** only for `StoreUnavailableError` (a store that went away), with
  exponential backoff; model math is deterministic and is not retried.
* **Per item**: an output checkpoint already in the store that verifies is reused, so
  a task re-run after a crash, or for a grown dataset, skips done work.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

from prefect import Task, task
from prefect.client.schemas.objects import FlowRun, TaskRun
from prefect.context import TaskRunContext
from prefect.deployments import run_deployment
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger
from prefect.runtime import flow_run, task_run
from prefect.states import Failed, State
from prefect.tasks import exponential_backoff

from fastvideo.jobs.item_phases import guarded
from fastvideo.jobs.items import ItemResult, ItemSpec, Shard, to_jsonable
from fastvideo.storage import ArtifactStore, StoreUnavailableError, open_store, retry_io
from tasks.dispatch import Dispatch

# Bump when a task's output format changes, so old cache entries stop matching.
CACHE_VERSION = 1
# Task parameters that choose where work runs, not what it computes.
_NOT_IN_CACHE_KEY = frozenset({"dispatch"})

ItemWork = Callable[[ItemSpec, list[ItemResult]], ItemResult]


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a run (its lines show in the UI), a plain one outside."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("tasks")


def shard_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """sha256 of the task name and its parameters (references carry their digests)."""
    keyed = {k: _what_counts(v) for k, v in parameters.items() if k not in _NOT_IN_CACHE_KEY}
    payload = {"task": context.task.name, "version": CACHE_VERSION,
               "parameters": to_jsonable(keyed)}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return f"{context.task.name}-{hashlib.sha256(canonical.encode()).hexdigest()}"


def _what_counts(value: Any) -> Any:
    """A parameter as far as it decides the task's output. A shard counts by its items: its
    index and their dataset rows are only names, and shift between runs. An upstream result
    counts by its reference (with its digest) or its error: how long it took, or whether
    it was reused or cached, changes nothing downstream."""
    if isinstance(value, Shard):
        return [replace(item, row=None) for item in value.items]
    if isinstance(value, ItemResult):
        return replace(value, seconds=0.0, info={})
    if isinstance(value, dict):
        return {k: _what_counts(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_what_counts(v) for v in value]
    return value


def retry_on_store_unavailable(task: Task[..., Any], task_run: TaskRun, state: State) -> bool:
    """Retry a task only when the store was unreachable; never for model errors."""
    return isinstance(state.result(raise_on_failure=False), StoreUnavailableError)


def _task_run_name(stage: str) -> Callable[[], str]:
    def name() -> str:
        shard = task_run.parameters.get("shard")
        return shard.label(stage) if isinstance(shard, Shard) else stage
    return name


def stage_task(stage: str, **options: Any) -> Callable[[Callable[..., Any]], Task[..., Any]]:
    """`@task` with the options every stage task uses (see the module docstring)."""
    defaults: dict[str, Any] = dict(
        name=stage, task_run_name=_task_run_name(stage), cache_key_fn=shard_cache_key,
        persist_result=True, result_serializer="json", retries=3,
        retry_delay_seconds=exponential_backoff(backoff_factor=2),
        retry_condition_fn=retry_on_store_unavailable)
    return task(**{**defaults, **options})


@functools.lru_cache(maxsize=16)
def get_store(uri: str) -> ArtifactStore:
    """The store a URI names, opened once per process (an S3 client is slow to make)."""
    return retry_io(lambda: open_store(uri))


def run_shard(stage: str, shard: Shard, upstream: Sequence[Sequence[ItemResult]],
              work: ItemWork) -> list[ItemResult] | State:
    """Apply `work(item, upstream results)` to every item whose upstream stages succeeded.

    An item that failed upstream is passed on as it is; an exception fails only its item
    (`item_phases.guarded`), except `StoreUnavailableError`, which fails the task so
    Prefect retries it. Returns
    the results, or a `Failed` state carrying them when an item failed in this stage.
    """
    logger = run_logger()
    results: list[ItemResult] = []
    for i, item in enumerate(shard.items):
        inputs = [results_of_stage[i] for results_of_stage in upstream]
        assert all(r.item_id == item.item_id for r in inputs), "upstream results out of order"
        failed_before = next((r for r in inputs if not r.ok), None)
        if failed_before is not None:
            results.append(failed_before)
            continue
        result = guarded(stage, item.item_id, lambda item=item, inputs=inputs: work(item, inputs),
                         logger, raise_unavailable=True)
        if result.ok:
            how = "reused" if result.info.get("reused") else f"{result.seconds:.3f} s"
            logger.info("%s item %s: %s -> %s", stage, item.item_id, how,
                        result.ref.uri if result.ref else "-")
        results.append(result)
    return finish_shard(stage, results)


def finish_shard(stage: str, results: list[ItemResult]) -> list[ItemResult] | State:
    failed = [r for r in results if r.failed_stage == stage]
    if not failed:
        return results
    return Failed(message=f"{len(failed)} of {len(results)} item(s) failed in {stage}; first: "
                          f"{failed[0].item_id}: {failed[0].error}", data=results)


GPU_COUNT_VARIABLE = "gpu_count"
"""The GPU work pool's job variable for the GPUs of one job (infra/k8s/gpu-job-template.json)."""


def run_gpu_deployment(dispatch: Dispatch, parameters: dict[str, Any], job_digest: str
                       ) -> FlowRun:
    """A flow run of the dispatch's GPU deployment for one job, waited for.

    The idempotency key (this flow run and the job's digest) makes a retried parent attach
    to the GPU run already going instead of starting another; a run from before this
    attempt that failed gets one more, deterministically named. The GPU job's size is
    fixed before it starts: the Kubernetes template requests `gpu_count` GPUs (a process
    worker ignores the variable).
    """
    job_variables = {GPU_COUNT_VARIABLE: dispatch.nproc_per_node}
    idempotency_key = f"{flow_run.id}-{job_digest}"
    started = datetime.now(timezone.utc)
    child = run_deployment(dispatch.deployment_name, parameters=parameters,
                           job_variables=job_variables, idempotency_key=idempotency_key,
                           timeout=dispatch.timeout_s)
    if not child.state.is_completed() and child.created < started:
        child = run_deployment(dispatch.deployment_name, parameters=parameters,
                               job_variables=job_variables,
                               idempotency_key=f"{idempotency_key}-after-{child.id}",
                               timeout=dispatch.timeout_s)
    return child
