"""One task per pipeline stage (denoising is in `tasks.denoise`).

Each is thin: read the input checkpoints, run the engine's stage, write the output
checkpoint, return small references. Checkpoint keys derive from the model fingerprint,
the stage, its parameters and the input digests (`fastvideo.storage.checkpoint_key`).
"""

from __future__ import annotations

import hashlib
import re
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from prefect.states import State

from fastvideo.pipelines.pipeline_batch_info import ForwardBatch
from fastvideo.storage import CheckpointRef, checkpoint_key, read_inputs, retry_io
from fastvideo.utils.video_io import video_file_name, write_mp4
from tasks.common import checkpointed, get_store, run_shard, stage_task
from tasks.engine import run_stages
from tasks.items import ItemResult, ItemSpec, RunContext, Shard

ENCODE_NEGATIVE = "encode-negative"
ENCODE_TEXT = "encode-text"
PREPARE_LATENTS = "prepare-latents"
DECODE = "decode"
WRITE_VIDEO = "write-video"


def stage_key(ctx: RunContext, stage: str, params: dict[str, Any],
              input_digest: str | None = None, engine: tuple[str, str] | None = None) -> str:
    """The checkpoint key of a stage's output; the engine's device kind and dtype count
    (`engine`: the stage's own (device, dtype), when it is not the run's)."""
    device, dtype = engine or (ctx.device, ctx.dtype)
    engine = {"device": device.split(":")[0], "dtype": dtype}
    return checkpoint_key(model_fingerprint=ctx.model_fingerprint, stage=stage,
                          params={**params, "engine": engine}, input_digest=input_digest)


def _timed(ctx: RunContext, stage_names: Sequence[str], batch: ForwardBatch
           ) -> tuple[ForwardBatch, float]:
    batch = run_stages(ctx, stage_names, batch)
    return batch, sum(batch.timings.get(name, 0.0) for name in stage_names)


@stage_task(ENCODE_NEGATIVE)
def encode_negative_prompt(ctx: RunContext) -> ItemResult:
    """Embed the run's negative prompt once; items that use it share this checkpoint."""
    key = stage_key(ctx, ENCODE_NEGATIVE, {"negative_prompt": ctx.negative_prompt,
                                           "max_sequence_length": ctx.max_sequence_length})

    def compute() -> tuple[ForwardBatch, float]:
        # Encoded as a prompt without guidance: the same text encoder call, one output.
        batch, seconds = _timed(ctx, ["text_encoding_stage"], ForwardBatch(
            prompt=[ctx.negative_prompt], guidance_scale=1.0,
            max_sequence_length=ctx.max_sequence_length))
        return ForwardBatch(negative_prompt=[ctx.negative_prompt],
                            max_sequence_length=ctx.max_sequence_length,
                            negative_prompt_embeds=batch.prompt_embeds), seconds

    return checkpointed(get_store(ctx.store_uri), key, "negative",
                        ("negative_prompt", "max_sequence_length", "negative_prompt_embeds"),
                        compute)


@stage_task(ENCODE_TEXT)
def encode_text(shard: Shard, ctx: RunContext, negative: ItemResult | None
                ) -> list[ItemResult] | State:
    """Validate each request and embed its prompt (and its own negative prompt, if any)."""
    store = get_store(ctx.store_uri)
    shared: list[torch.Tensor] = []  # the shared negative embedding, read once per shard

    def work(item: ItemSpec, _: list[ItemResult]) -> ItemResult:
        cfg = item.guidance_scale > 1.0
        own_negative = cfg and not item.shared_negative
        key = stage_key(ctx, ENCODE_TEXT, {
            "prompt": item.prompt, "max_sequence_length": item.max_sequence_length,
            "negative_prompt": item.negative_prompt if own_negative else None})

        def compute() -> tuple[ForwardBatch, float]:
            batch = item.to_batch()
            if cfg and item.shared_negative:
                if negative is None or not negative.ok:
                    raise ValueError(f"the run's negative prompt embedding is missing: "
                                     f"{negative.error if negative else 'not computed'}")
                if not shared:
                    shared.append(read_inputs(store, [negative.ref]).negative_prompt_embeds)
                batch.negative_prompt_embeds = shared[0]  # the stage keeps it, encodes no more
            return _timed(ctx, ["input_validation_stage", "text_encoding_stage"], batch)

        fields = (*ForwardBatch.request_field_names(), "prompt_embeds",
                  *(("negative_prompt_embeds",) if own_negative else ()))
        return checkpointed(store, key, item.item_id, fields, compute)

    return run_shard(ENCODE_TEXT, shard, [], work)


@stage_task(PREPARE_LATENTS)
def prepare_latents(shard: Shard, ctx: RunContext, text: list[ItemResult]
                    ) -> list[ItemResult] | State:
    """Timesteps and the initial noise (seeded per item) for every item encoded so far."""
    store = get_store(ctx.store_uri)

    def work(item: ItemSpec, _: list[ItemResult]) -> ItemResult:
        key = stage_key(ctx, PREPARE_LATENTS, {"seed": item.seed, **item.sampling})
        fields = (*ForwardBatch.request_field_names(), "timesteps", "latents", "step_index")
        return checkpointed(
            store, key, item.item_id, fields,
            lambda: _timed(ctx, ["timestep_preparation_stage", "latent_preparation_stage"],
                           item.to_batch()))

    return run_shard(PREPARE_LATENTS, shard, [text], work)


@stage_task(DECODE)
def decode(shard: Shard, ctx: RunContext, denoised: list[ItemResult]) -> list[ItemResult] | State:
    """Decode the final latents to frames, stored as uint8 (what the video holds, 4x smaller)."""
    store = get_store(ctx.store_uri)

    def work(item: ItemSpec, inputs: list[ItemResult]) -> ItemResult:
        ref = inputs[0].ref
        key = stage_key(ctx, DECODE, {"frames": "uint8"}, ref.digest)

        def compute() -> tuple[ForwardBatch, float]:
            batch, seconds = _timed(ctx, ["decoding_stage"], read_inputs(store, [ref]))
            # The same rounding `write_mp4` applies, so the video is unchanged.
            batch.output = (batch.output.clamp(0, 1) * 255).round().to(torch.uint8)
            return batch, seconds

        return checkpointed(store, key, item.item_id,
                            (*ForwardBatch.request_field_names(), "output"), compute)

    return run_shard(DECODE, shard, [denoised], work)


def video_key(item: ItemSpec) -> str:
    safe_id = re.sub(r"[^A-Za-z0-9._-]+", "-", item.item_id).strip("-.") or "item"
    return f"videos/{safe_id}_{video_file_name(item.prompt, item.seed)}"


@stage_task(WRITE_VIDEO)
def write_videos(shard: Shard, ctx: RunContext, decoded: list[ItemResult]
                 ) -> list[ItemResult] | State:
    """Encode each item's frames as mp4 under `<output>/videos/`; the ref holds its sha256."""
    store = get_store(ctx.store_uri)
    output = get_store(ctx.output_uri)

    def work(item: ItemSpec, inputs: list[ItemResult]) -> ItemResult:
        frames = read_inputs(store, [inputs[0].ref]).output[0].float() / 255
        key = video_key(item)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            path = write_mp4(frames, Path(tmp) / "video.mp4", fps=ctx.fps)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            retry_io(lambda: output.put_file(key, path))
        return ItemResult(item.item_id, ref=CheckpointRef(output.root_uri, key, digest),
                          seconds=time.perf_counter() - start)

    return run_shard(WRITE_VIDEO, shard, [decoded], work)
