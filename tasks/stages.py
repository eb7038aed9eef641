"""One task per pipeline phase (the denoise phase is `tasks.denoise`), for any pipeline.

Each is thin: the per-item work (checkpoint key, engine call, reuse of a finished output)
is `fastvideo.jobs.item_phases`, the same the warm worker runs; the task loops it over
its shard and returns small references. A phase's task is named after the phase, so
the UI shows `encode-text-shard-00003`, `decode-shard-00003`, ...
"""

from __future__ import annotations

import functools
from typing import Any

from prefect import Task
from prefect.context import TaskRunContext
from prefect.states import State

from fastvideo.jobs import item_phases
from fastvideo.jobs.item_phases import ENCODE_NEGATIVE, WRITE_VIDEO, phase_inputs
from fastvideo.jobs.items import ItemResult, ItemSpec, RunContext, Shard
from fastvideo.pipelines.phases import Phase
from tasks.common import get_store, run_shard, shard_cache_key, stage_task


@stage_task(ENCODE_NEGATIVE)
def encode_negative_prompt(ctx: RunContext, phases: tuple[Phase, ...]) -> ItemResult:
    """Embed the run's negative prompt once; items that use it share this checkpoint."""
    return item_phases.encode_negative(ctx, get_store(ctx.store_uri), phases)


def _run_phase(shard: Shard, ctx: RunContext, phases: tuple[Phase, ...], index: int,
               upstream: dict[str, list[ItemResult]], negative: ItemResult | None
               ) -> list[ItemResult] | State:
    """Phase `index` for every item whose earlier phases succeeded."""
    store = get_store(ctx.store_uri)
    shared = item_phases.NegativeEmbedding(store, negative)
    phase = phases[index]
    names = list(upstream)

    def work(item: ItemSpec, inputs: list[ItemResult]) -> ItemResult:
        results = dict(zip(names, inputs))
        return item_phases.run_phase(ctx, store, phase, item,
                                     phase_inputs(phases, index, results, item, negative), shared)

    return run_shard(phase.name, shard, list(upstream.values()), work)


@functools.cache
def phase_task(name: str) -> Task[..., Any]:
    """The task that runs the phase `name` over a shard (one task object per name)."""
    return stage_task(name)(_run_phase)


def _write_videos(shard: Shard, ctx: RunContext, last: Phase, decoded: list[ItemResult]
                  ) -> list[ItemResult] | State:
    """Encode each item's frames as mp4 under `<output>/videos/`; the ref holds its sha256."""
    store, output = get_store(ctx.store_uri), get_store(ctx.output_uri)

    def work(item: ItemSpec, inputs: list[ItemResult]) -> ItemResult:
        return item_phases.write_video(ctx, store, output, item, last, inputs[0].ref)

    return run_shard(WRITE_VIDEO, shard, [decoded], work)


def _video_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """The stage's cache key, unless a video its cached result names is gone from the
    output (deleted since): then a key of this task run alone, so the video is written
    again, while the cached result stays for later reruns (the same frames encode to the
    same bytes)."""
    key = shard_cache_key(context, parameters)
    shard, ctx, decoded = parameters["shard"], parameters["ctx"], parameters["decoded"]
    output = get_store(ctx.output_uri)
    lost = not all(output.exists(item_phases.video_key(item))
                   for item, result in zip(shard.items, decoded) if result.ok)
    if lost and context.result_store.exists(key):
        return f"{key}-rewrite-{context.task_run.id}"
    return key


write_videos = stage_task(WRITE_VIDEO, cache_key_fn=_video_cache_key)(_write_videos)
