"""What each stage does for one item: its checkpoint key, its inputs, its engine call.

Shared by the Prefect tasks (one stage over a shard, in the flow's process) and the warm
worker (every stage of a shard, on the GPU node), so both compute the same keys and the
same outputs. A key derives from the model fingerprint, the stage, its parameters (the
engine options that change its result included), the engine's device kind and dtype,
and the input digests (`fastvideo.storage.checkpoint_key`). An output already in the
store that verifies is reused.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fastvideo.jobs.denoise import DenoiseItem, DenoiseOutcome
from fastvideo.jobs.engine import run_stages
from fastvideo.jobs.items import ItemResult, ItemSpec, RunContext, combined_digest, failure
from fastvideo.forward_batch import ForwardBatch
from fastvideo.storage import (
    ArtifactStore,
    CheckpointRef,
    checkpoint_key,
    load_valid_checkpoint,
    read_inputs,
    retry_io,
    write_checkpoint,
)
from fastvideo.utils.video_io import video_file_name, write_mp4

ENCODE_NEGATIVE = "encode-negative"
ENCODE_TEXT = "encode-text"
PREPARE_LATENTS = "prepare-latents"
DENOISE = "denoise"
DENOISE_PROGRESS = "denoise-progress"
DECODE = "decode"
WRITE_VIDEO = "write-video"
STAGES = (ENCODE_TEXT, PREPARE_LATENTS, DENOISE, DECODE, WRITE_VIDEO)
"""The stages of an item, in order (the run's negative prompt is encoded once, before)."""


def stage_key(ctx: RunContext, stage: str, params: dict[str, Any],
              input_digest: str | None = None, engine: tuple[str, str] | None = None) -> str:
    """The checkpoint key of a stage's output; the engine's device kind and dtype count
    (`engine`: the stage's own (device, dtype), when it is not the run's), and so do the
    engine options that change this stage's result."""
    assert ctx.model_fingerprint is not None, "fingerprint the model first (with_fingerprint)"
    device, dtype = engine or (ctx.device, ctx.dtype)
    engine_params = {"device": device.split(":")[0], "dtype": dtype,
                     **ctx.options.stage_params(stage)}
    return checkpoint_key(model_fingerprint=ctx.model_fingerprint, stage=stage,
                          params={**params, "engine": engine_params}, input_digest=input_digest)


def checkpointed(store: ArtifactStore, key: str, item_id: str, fields: Sequence[str],
                 compute: Callable[[], tuple[ForwardBatch, float]]) -> ItemResult:
    """Reuse the checkpoint under `key` if it verifies, else `compute()` and write it."""
    existing = load_valid_checkpoint(store, key)
    if existing is not None:
        return ItemResult(item_id, ref=existing[0], info={"reused": True})
    batch, seconds = compute()
    start = time.perf_counter()
    ref = retry_io(lambda: write_checkpoint(store, key, batch, fields))
    return ItemResult(item_id, ref=ref, seconds=seconds,
                      info={"write_s": round(time.perf_counter() - start, 4)})


def _timed(ctx: RunContext, stage_names: Sequence[str], batch: ForwardBatch
           ) -> tuple[ForwardBatch, float]:
    batch = run_stages(ctx, stage_names, batch)
    return batch, sum(batch.timings.get(name, 0.0) for name in stage_names)


def encode_negative(ctx: RunContext, store: ArtifactStore) -> ItemResult:
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

    return checkpointed(store, key, "negative",
                        ("negative_prompt", "max_sequence_length", "negative_prompt_embeds"),
                        compute)


class NegativeEmbedding:
    """The run's shared negative embedding, read from the store once per shard."""

    def __init__(self, store: ArtifactStore, result: ItemResult | None) -> None:
        self.store, self.result = store, result
        self._embeds: torch.Tensor | None = None

    def get(self) -> torch.Tensor:
        if self.result is None or not self.result.ok:
            raise ValueError(f"the run's negative prompt embedding is missing: "
                             f"{self.result.error if self.result else 'not computed'}")
        if self._embeds is None:
            self._embeds = read_inputs(self.store, [self.result.ref]).negative_prompt_embeds
        return self._embeds


def encode_text(ctx: RunContext, store: ArtifactStore, item: ItemSpec,
                negative: NegativeEmbedding) -> ItemResult:
    """Validate the request and embed its prompt (and its own negative prompt, if any)."""
    cfg = item.guidance_scale > 1.0
    own_negative = cfg and not item.shared_negative
    key = stage_key(ctx, ENCODE_TEXT, {
        "prompt": item.prompt, "max_sequence_length": item.max_sequence_length,
        "negative_prompt": item.negative_prompt if own_negative else None})

    def compute() -> tuple[ForwardBatch, float]:
        batch = item.to_batch()
        if cfg and item.shared_negative:
            batch.negative_prompt_embeds = negative.get()  # the stage keeps it, encodes no more
        return _timed(ctx, ["input_validation_stage", "text_encoding_stage"], batch)

    fields = (*ForwardBatch.request_field_names(), "prompt_embeds",
              *(("negative_prompt_embeds",) if own_negative else ()))
    return checkpointed(store, key, item.item_id, fields, compute)


def prepare_latents(ctx: RunContext, store: ArtifactStore, item: ItemSpec) -> ItemResult:
    """Timesteps and the initial noise (seeded per item)."""
    key = stage_key(ctx, PREPARE_LATENTS, {"seed": item.seed, **item.sampling})
    fields = (*ForwardBatch.request_field_names(), "timesteps", "latents", "step_index")
    return checkpointed(
        store, key, item.item_id, fields,
        lambda: _timed(ctx, ["timestep_preparation_stage", "latent_preparation_stage"],
                       item.to_batch()))


def denoise_inputs(item: ItemSpec, text: ItemResult, latents: ItemResult,
                   negative: ItemResult | None) -> list[CheckpointRef]:
    """The checkpoints an item's denoising reads, in order."""
    inputs = [text.ref, latents.ref]
    if item.guidance_scale > 1.0 and item.shared_negative:
        inputs.append(negative.ref)
    return inputs


def denoise_item(ctx: RunContext, item_id: str, inputs: list[CheckpointRef]) -> DenoiseItem:
    """The denoise job entry of an item: where its output and its progress go."""
    output_key = stage_key(ctx, DENOISE, {}, combined_digest(inputs),
                           engine=(ctx.denoise_device, ctx.denoise_dtype))
    # The same hash under another stage folder: the progress of exactly that output.
    progress_key = output_key.replace(f"/{DENOISE}/", f"/{DENOISE_PROGRESS}/", 1)
    return DenoiseItem(item_id=item_id, inputs=tuple(inputs), output_key=output_key,
                       progress_key=progress_key)


def denoise_result(outcome: DenoiseOutcome) -> ItemResult:
    """An item's denoise outcome as its stage result."""
    if outcome.error is not None:
        return failure(outcome.item_id, DENOISE, outcome.error, outcome.corrupt_input)
    return ItemResult(outcome.item_id, ref=outcome.ref, seconds=outcome.seconds,
                      info={"reused": outcome.skipped,
                            "resumed_from_step": outcome.resumed_from_step})


def decode(ctx: RunContext, store: ArtifactStore, item: ItemSpec, denoised: CheckpointRef,
           batch: ForwardBatch | None = None) -> ItemResult:
    """Decode the final latents to frames, stored as uint8 (what the video holds, 4x
    smaller). `batch`: the denoised batch already in memory (else it is read)."""
    key = stage_key(ctx, DECODE, {"frames": "uint8"}, denoised.digest)

    def compute() -> tuple[ForwardBatch, float]:
        start = batch if batch is not None else read_inputs(store, [denoised])
        decoded, seconds = _timed(ctx, ["decoding_stage"], start)
        # The same rounding `write_mp4` applies, so the video is unchanged.
        decoded.output = (decoded.output.clamp(0, 1) * 255).round().to(torch.uint8)
        return decoded, seconds

    return checkpointed(store, key, item.item_id,
                        (*ForwardBatch.request_field_names(), "output"), compute)


def video_key(item: ItemSpec) -> str:
    safe_id = re.sub(r"[^A-Za-z0-9._-]+", "-", item.item_id).strip("-.") or "item"
    return f"videos/{safe_id}_{video_file_name(item.prompt, item.seed)}"


def write_video(ctx: RunContext, store: ArtifactStore, output: ArtifactStore, item: ItemSpec,
                decoded: CheckpointRef) -> ItemResult:
    """Encode the item's frames as mp4 under `<output>/videos/`; the ref holds its sha256."""
    frames = read_inputs(store, [decoded]).output[0].float() / 255
    key = video_key(item)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = write_mp4(frames, Path(tmp) / "video.mp4", fps=ctx.fps)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        retry_io(lambda: output.put_file(key, path))
    return ItemResult(item.item_id, ref=CheckpointRef(output.root_uri, key, digest),
                      seconds=time.perf_counter() - start)
