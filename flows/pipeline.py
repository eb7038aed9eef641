"""The stage sequence both flows run over their shards.

Placement `all` (`process_remote`): one `generate-shard` task per shard hands it whole to
a warm worker; shards are kept in flight one more than `concurrency`, so a worker always
has the next shard queued and its GPU never waits for the flow between shards.

Otherwise (`process_window`), stage by stage, a window's shards are submitted together
(the flow's task runner decides how many run at once), so with dispatch `deployment`
their GPU jobs run side by side. An item that fails stays failed in later stages; a shard with no live
item left skips the remaining stages. When a stage finds one of its inputs corrupt or
gone, the stage that wrote it is re-run for that shard without its cache (it recomputes
the bad checkpoint), then the stage itself, once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from prefect import Task
from prefect.futures import PrefectFuture
from prefect.states import State

from fastvideo.jobs.item_stages import STAGES
from fastvideo.jobs.items import ItemResult, RunContext, Shard, failure
from tasks.denoise import DENOISE, denoise
from tasks.dispatch import Dispatch
from tasks.shard import generate_shard
from tasks.stages import (
    DECODE,
    ENCODE_NEGATIVE,
    ENCODE_TEXT,
    PREPARE_LATENTS,
    WRITE_VIDEO,
    decode,
    encode_negative_prompt,
    encode_text,
    prepare_latents,
    write_videos,
)

WindowResults = dict[str, list[list[ItemResult]]]


def shard_results(state: State, shard: Shard, stage: str) -> list[ItemResult]:
    """A stage task's per-item results; when the task itself failed, every item fails."""
    data = state.result(raise_on_failure=False)
    if isinstance(data, list):
        return data
    error = f"{stage} task ended {state.name}: {data}"
    return [failure(item.item_id, stage, error) for item in shard.items]


def negative_result(state: State) -> ItemResult:
    data = state.result(raise_on_failure=False)
    return data if isinstance(data, ItemResult) else failure(
        "negative", ENCODE_NEGATIVE, f"{ENCODE_NEGATIVE} task ended {state.name}: {data}")


def encode_negative(ctx: RunContext, refresh: bool = False) -> ItemResult:
    """The run's shared negative-prompt embedding, computed once per run."""
    task = encode_negative_prompt.with_options(refresh_cache=True) if refresh \
        else encode_negative_prompt
    return negative_result(task(ctx, return_state=True))


def process_window(shards: list[Shard], ctx: RunContext, negative: ItemResult,
                   dispatch: Dispatch) -> WindowResults:
    """Run every stage over `shards`; returns each stage's results, per shard, per item."""
    results: WindowResults = {}
    shared = {"negative": negative}
    calls: dict[str, tuple[Task[..., Any], Callable[[int], dict[str, Any]]]] = {
        ENCODE_TEXT: (encode_text, lambda i: dict(
            shard=shards[i], ctx=ctx, negative=shared["negative"])),
        PREPARE_LATENTS: (prepare_latents, lambda i: dict(
            shard=shards[i], ctx=ctx, text=results[ENCODE_TEXT][i])),
        DENOISE: (denoise, lambda i: dict(
            shard=shards[i], ctx=ctx, negative=shared["negative"],
            text=results[ENCODE_TEXT][i], latents=results[PREPARE_LATENTS][i],
            dispatch=dispatch)),
        DECODE: (decode, lambda i: dict(shard=shards[i], ctx=ctx, denoised=results[DENOISE][i])),
        WRITE_VIDEO: (write_videos, lambda i: dict(
            shard=shards[i], ctx=ctx, decoded=results[DECODE][i])),
    }

    def run_now(stage: str, i: int, refresh: bool = False) -> list[ItemResult]:
        task, kwargs = calls[stage]
        if refresh:
            task = task.with_options(refresh_cache=True)
        return shard_results(task(**kwargs(i), return_state=True), shards[i], stage)

    for position, stage in enumerate(STAGES):
        task, kwargs = calls[stage]
        previous = results[STAGES[position - 1]] if position else None
        futures: dict[int, PrefectFuture] = {}
        stage_results: list[list[ItemResult]] = []
        for i in range(len(shards)):
            if previous is not None and not any(r.ok for r in previous[i]):
                stage_results.append(previous[i])  # nothing left to do in this shard
            else:
                futures[i] = task.submit(**kwargs(i))
                stage_results.append([])
        for i, future in futures.items():
            future.wait()
            stage_results[i] = shard_results(future.state, shards[i], stage)
        results[stage] = stage_results
        for i in futures:
            producers = {r.corrupt_input.split("/")[1] for r in results[stage][i]
                         if r.corrupt_input}
            if not producers:
                continue
            for producer in producers:
                if producer == ENCODE_NEGATIVE:
                    shared["negative"] = encode_negative(ctx, refresh=True)
                else:
                    results[producer][i] = run_now(producer, i, refresh=True)
            results[stage][i] = run_now(stage, i)
    return results


def process_remote(shards: list[Shard], ctx: RunContext, dispatch: Dispatch, concurrency: int
                   ) -> Iterator[tuple[Shard, dict[str, list[ItemResult]]]]:
    """Each shard's results per stage, in shard order, as its `generate-shard` task ends."""
    in_flight: deque[tuple[Shard, PrefectFuture]] = deque()
    pending = iter(shards)
    for shard in pending:
        in_flight.append((shard, generate_shard.submit(shard, ctx, dispatch)))
        if len(in_flight) > max(concurrency, 1):
            break
    while in_flight:
        shard, future = in_flight.popleft()
        future.wait()
        results = future.state.result(raise_on_failure=False)
        if not isinstance(results, dict):
            error = f"generate-shard task ended {future.state.name}: {results}"
            results = {stage: [failure(i.item_id, STAGES[0], error) for i in shard.items]
                       for stage in STAGES}
        following = next(pending, None)
        if following is not None:
            in_flight.append((following, generate_shard.submit(following, ctx, dispatch)))
        yield shard, results


def run_shards(shards: list[Shard], ctx: RunContext, dispatch: Dispatch, concurrency: int
               ) -> Iterator[tuple[Shard, dict[str, list[ItemResult]]]]:
    """Each shard with its results per stage, as they finish: whole shards on a warm worker
    (placement `all`), else stage by stage over windows of `concurrency` shards."""
    if dispatch.remote_stages:
        yield from process_remote(shards, ctx, dispatch, concurrency)
        return
    negative = encode_negative(ctx)
    for first in range(0, len(shards), max(concurrency, 1)):
        window = shards[first:first + max(concurrency, 1)]
        results = process_window(window, ctx, negative, dispatch)
        for i, shard in enumerate(window):
            yield shard, {stage: r[i] for stage, r in results.items()}
