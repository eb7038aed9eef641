"""The phases of the model's pipeline (`fastvideo.pipelines.phases`), then the video,
run over shards: the sequence both flows share. Nothing here knows a pipeline's stages.

Placement `all` (`process_remote`): one `generate-shard` task per shard hands it whole to
a warm worker; `2 * concurrency + 1` shards are kept in flight (per GPU one being
denoised and one being decoded and written, plus one queued), so a worker always has the
next shard queued even when decoding takes longer than denoising (STA). The next shard goes
out as soon as any one ends, so the GPU never waits for the flow between shards.

Otherwise (`process_window`), stage by stage, a window's shards are submitted together
(the flow's task runner decides how many run at once), so with dispatch `deployment`
their GPU jobs run side by side. An item that fails stays failed in later stages; a shard with no live
item left skips the remaining stages. When a stage finds one of its inputs corrupt or
gone, the stage that wrote it is re-run for that shard without its cache (it recomputes
the bad checkpoint), then the stage itself, once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from prefect import Task
from prefect.futures import PrefectFuture, as_completed
from prefect.states import State

from fastvideo.jobs.item_phases import ENCODE_NEGATIVE, WRITE_VIDEO
from fastvideo.jobs.items import ItemResult, RunContext, Shard, failure
from fastvideo.pipelines.builder import model_phases
from fastvideo.pipelines.phases import Phase
from tasks.denoise import denoise_task
from tasks.dispatch import Dispatch
from tasks.manifest import write_training_data
from tasks.shard import SHARD_TASK, generate_shard
from tasks.stages import encode_negative_prompt, phase_task, write_videos

WindowResults = dict[str, list[list[ItemResult]]]


def shard_results(state: State, shard: Shard, stage: str) -> list[ItemResult]:
    """A stage task's per-item results (marked `cached` when Prefect returned them from an
    earlier run's); when the task itself failed, every item fails."""
    data = state.result(raise_on_failure=False)
    if isinstance(data, list):
        if state.name == "Cached":
            return [replace(r, info={**r.info, "cached": True}) for r in data]
        return data
    error = f"{stage} task ended {state.name}: {data}"
    return [failure(item.item_id, stage, error) for item in shard.items]


def negative_result(state: State) -> ItemResult:
    data = state.result(raise_on_failure=False)
    return data if isinstance(data, ItemResult) else failure(
        "negative", ENCODE_NEGATIVE, f"{ENCODE_NEGATIVE} task ended {state.name}: {data}")


def encode_negative(ctx: RunContext, phases: tuple[Phase, ...], refresh: bool = False
                    ) -> ItemResult | None:
    """The run's shared negative-prompt embedding, computed once per run (None when no
    phase of the pipeline shares one)."""
    if not any(p.shared_negative for p in phases):
        return None
    task = encode_negative_prompt.with_options(refresh_cache=True) if refresh \
        else encode_negative_prompt
    return negative_result(task(ctx, phases, return_state=True))


def process_window(shards: list[Shard], ctx: RunContext, phases: tuple[Phase, ...],
                   negative: ItemResult | None, dispatch: Dispatch) -> WindowResults:
    """Run every phase, then the video, over `shards`; returns each step's results, per
    shard, per item."""
    results: WindowResults = {}
    shared = {"negative": negative}
    steps = [p.name for p in phases] + [WRITE_VIDEO]

    def call(step: str, i: int) -> tuple[Task[..., Any], dict[str, Any]]:
        if step == WRITE_VIDEO:
            return write_videos, dict(shard=shards[i], ctx=ctx, last=phases[-1],
                                      decoded=results[phases[-1].name][i])
        index = steps.index(step)
        kwargs = dict(shard=shards[i], ctx=ctx, phases=phases, index=index,
                      upstream={s: results[s][i] for s in steps[:index]},
                      negative=shared["negative"])
        if phases[index].denoise:
            return denoise_task(step), {**kwargs, "dispatch": dispatch}
        return phase_task(step), kwargs

    def run_now(step: str, i: int, refresh: bool = False) -> list[ItemResult]:
        task, kwargs = call(step, i)
        if refresh:
            task = task.with_options(refresh_cache=True)
        return shard_results(task(**kwargs, return_state=True), shards[i], step)

    def redo_missing_inputs(step: str, i: int) -> None:
        """A missing or corrupt input names the phase that wrote it: redo that phase (its
        cache refreshed) and, the same way, whatever of its own inputs is gone too, then
        this step. So an output folder deleted between runs is made again from the text
        encoding on, although every stage of the earlier run is in Prefect's cache."""
        upstream = steps[:steps.index(step)]
        for _ in range(len(steps) + 1):  # a round redoes at least one upstream step
            producers = {r.corrupt_input for r in results[step][i] if r.corrupt_input}
            if not producers:
                return
            for producer in sorted(producers):
                if producer == ENCODE_NEGATIVE:
                    shared["negative"] = encode_negative(ctx, phases, refresh=True)
                elif producer in upstream:
                    results[producer][i] = run_now(producer, i, refresh=True)
                    redo_missing_inputs(producer, i)
            results[step][i] = run_now(step, i, refresh=True)

    for position, step in enumerate(steps):
        previous = results[steps[position - 1]] if position else None
        futures: dict[int, PrefectFuture] = {}
        step_results: list[list[ItemResult]] = []
        for i in range(len(shards)):
            if previous is not None and not any(r.ok for r in previous[i]):
                step_results.append(previous[i])  # nothing left to do in this shard
            else:
                task, kwargs = call(step, i)
                futures[i] = task.submit(**kwargs)
                step_results.append([])
        for i, future in futures.items():
            future.wait()
            step_results[i] = shard_results(future.state, shards[i], step)
        results[step] = step_results
        for i in futures:
            redo_missing_inputs(step, i)
    return results


def in_flight_limit(concurrency: int) -> int:
    """Shards a warm worker's flow keeps in flight: per GPU one denoising and one in the post
    lane (decode, mp4), plus one queued. With fewer, the GPU idles whenever an item's decode
    outlasts the next item's denoise."""
    return 2 * max(concurrency, 1) + 1


def process_remote(shards: list[Shard], ctx: RunContext, dispatch: Dispatch, concurrency: int
                   ) -> Iterator[tuple[Shard, dict[str, list[ItemResult]]]]:
    """Each shard's results per stage, as its `generate-shard` task ends, in the order they
    end. The next shard goes out as soon as any shard in flight ends: a worker serves shards
    in the order they reach it, which is not always the order the flow submitted them, and
    waiting for the oldest left the GPU idle (an H200 STA run: shard 0 reached the worker
    after shard 2, and shard 3 went out only when shard 0's decode ended, 6 s after the
    GPU had finished shard 1)."""
    pending = iter(shards)
    in_flight: dict[PrefectFuture, Shard] = {}

    def submit_next() -> None:
        shard = next(pending, None)
        if shard is not None:
            in_flight[generate_shard.submit(shard, ctx, dispatch)] = shard

    for _ in range(in_flight_limit(concurrency)):
        submit_next()
    while in_flight:
        future = next(as_completed(list(in_flight)))
        future.wait()  # ended: this keeps its final state, with its data, on the future
        shard = in_flight.pop(future)
        submit_next()
        results = future.state.result(raise_on_failure=False)
        if not isinstance(results, dict):
            error = f"{SHARD_TASK} task ended {future.state.name}: {results}"
            results = {SHARD_TASK: [failure(i.item_id, SHARD_TASK, error) for i in shard.items]}
        yield shard, results


def run_shards(shards: list[Shard], ctx: RunContext, dispatch: Dispatch, concurrency: int
               ) -> Iterator[tuple[Shard, dict[str, list[ItemResult]]]]:
    """Each shard with its results per stage, as they finish: whole shards on a warm worker
    (placement `all`), else stage by stage over windows of `concurrency` shards."""
    if dispatch.remote_stages:
        yield from process_remote(shards, ctx, dispatch, concurrency)
        return
    phases = model_phases(ctx.model_path)
    negative = encode_negative(ctx, phases)
    for first in range(0, len(shards), max(concurrency, 1)):
        window = shards[first:first + max(concurrency, 1)]
        results = process_window(window, ctx, phases, negative, dispatch)
        for i, shard in enumerate(window):
            by_step = {stage: r[i] for stage, r in results.items()}
            if ctx.training_data:  # on a warm worker, the worker writes it
                write_training_data(shard, ctx, phases, by_step)
            yield shard, by_step
