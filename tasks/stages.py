"""One task per pipeline stage (denoising is in `tasks.denoise`).

Each is thin: the per-item work (checkpoint key, engine call, reuse of a finished output)
is `fastvideo.jobs.item_stages`, the same the warm worker runs; the task loops it over
its shard and returns small references.
"""

from __future__ import annotations

from prefect.states import State

from fastvideo.jobs import item_stages
from fastvideo.jobs.item_stages import (
    DECODE,
    ENCODE_NEGATIVE,
    ENCODE_TEXT,
    PREPARE_LATENTS,
    WRITE_VIDEO,
)
from fastvideo.jobs.items import ItemResult, ItemSpec, RunContext, Shard
from tasks.common import get_store, run_shard, stage_task

__all__ = ["DECODE", "ENCODE_NEGATIVE", "ENCODE_TEXT", "PREPARE_LATENTS", "WRITE_VIDEO"]


@stage_task(ENCODE_NEGATIVE)
def encode_negative_prompt(ctx: RunContext) -> ItemResult:
    """Embed the run's negative prompt once; items that use it share this checkpoint."""
    return item_stages.encode_negative(ctx, get_store(ctx.store_uri))


@stage_task(ENCODE_TEXT)
def encode_text(shard: Shard, ctx: RunContext, negative: ItemResult | None
                ) -> list[ItemResult] | State:
    """Validate each request and embed its prompt (and its own negative prompt, if any)."""
    store = get_store(ctx.store_uri)
    shared = item_stages.NegativeEmbedding(store, negative)
    return run_shard(ENCODE_TEXT, shard, [], lambda item, _: item_stages.encode_text(
        ctx, store, item, shared))


@stage_task(PREPARE_LATENTS)
def prepare_latents(shard: Shard, ctx: RunContext, text: list[ItemResult]
                    ) -> list[ItemResult] | State:
    """Timesteps and the initial noise (seeded per item) for every item encoded so far."""
    store = get_store(ctx.store_uri)
    return run_shard(PREPARE_LATENTS, shard, [text],
                     lambda item, _: item_stages.prepare_latents(ctx, store, item))


@stage_task(DECODE)
def decode(shard: Shard, ctx: RunContext, denoised: list[ItemResult]) -> list[ItemResult] | State:
    """Decode the final latents to frames, stored as uint8 (what the video holds)."""
    store = get_store(ctx.store_uri)

    def work(item: ItemSpec, inputs: list[ItemResult]) -> ItemResult:
        return item_stages.decode(ctx, store, item, inputs[0].ref)

    return run_shard(DECODE, shard, [denoised], work)


@stage_task(WRITE_VIDEO)
def write_videos(shard: Shard, ctx: RunContext, decoded: list[ItemResult]
                 ) -> list[ItemResult] | State:
    """Encode each item's frames as mp4 under `<output>/videos/`; the ref holds its sha256."""
    store, output = get_store(ctx.store_uri), get_store(ctx.output_uri)

    def work(item: ItemSpec, inputs: list[ItemResult]) -> ItemResult:
        return item_stages.write_video(ctx, store, output, item, inputs[0].ref)

    return run_shard(WRITE_VIDEO, shard, [decoded], work)
