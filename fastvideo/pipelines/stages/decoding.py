"""DecodingStage: final latents -> frames in [0, 1]."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.forward_batch import ForwardBatch
from fastvideo.models.vae_chunks import decode_in_chunks
from fastvideo.models.vae_speed import vae_input
from fastvideo.pipelines.stages.base import PipelineStage
from fastvideo.pipelines.stages.latent_normalization import LatentNormalization
from fastvideo.utils.video_io import to_uint8

FrameSink = Callable[[torch.Tensor], None]
"""Takes decoded frames `[B, t, H, W, 3]` in [0, 1], on the VAE's device, in order."""

_SINK: ContextVar[FrameSink | None] = ContextVar("fastvideo_frame_sink", default=None)
_UINT8: ContextVar[bool] = ContextVar("fastvideo_frames_as_uint8", default=False)


@contextmanager
def frames_as_uint8() -> Iterator[None]:
    """Within this block (this thread), every `DecodingStage` returns its frames rounded to
    uint8 (`video_io.to_uint8`, the same on any device) on the VAE's device before copying
    them to the CPU: a quarter of the bytes to copy, no rounding pass on the host. For a
    caller that stores or encodes 8-bit frames anyway (the batch jobs' decode phase)."""
    token = _UINT8.set(True)
    try:
        yield
    finally:
        _UINT8.reset(token)


@contextmanager
def frame_sink(sink: FrameSink) -> Iterator[None]:
    """Within this block (this thread), every `DecodingStage` hands its frames to `sink`
    as they are decoded: chunk by chunk where the VAE decodes that way, else whole."""
    token = _SINK.set(sink)
    try:
        yield
    finally:
        _SINK.reset(token)


class DecodingStage(PipelineStage):
    """Undoes the family's latent normalisation, decodes, and returns `[B, T, H, W, 3]`
    float32 in [0, 1] (on the CPU; uint8 inside `frames_as_uint8`); inside `frame_sink`
    also hands the frames over as they come."""

    reads = ("latents",)
    writes = ("output",)

    def __init__(self, vae: Any, normalization: LatentNormalization) -> None:
        self.vae = vae
        self.normalization = normalization

    @torch.no_grad()
    def forward(self, batch: ForwardBatch, fastvideo_args: FastVideoArgs) -> ForwardBatch:
        param = next(self.vae.parameters())
        latents = batch.latents.to(param.device, param.dtype)
        latents = vae_input(self.vae, self.normalization.denormalize(latents))
        sink = _SINK.get()
        chunks = decode_in_chunks(self.vae, latents) if sink is not None else None
        if chunks is None:
            chunks = iter([self.vae.decode(latents, return_dict=False)[0]])
        parts = []
        for video in chunks:
            frames = (video * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1)
            if sink is not None:
                sink(frames)
            parts.append(frames)
        frames = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        batch.output = (to_uint8(frames) if _UINT8.get() else frames.float()).cpu()
        return batch
