"""DecodingStage: final latents -> frames in [0, 1]."""

from __future__ import annotations

from typing import Any

import torch

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.forward_batch import ForwardBatch
from fastvideo.models.vae_speed import vae_input
from fastvideo.pipelines.stages.base import PipelineStage
from fastvideo.pipelines.stages.latent_normalization import LatentNormalization


class DecodingStage(PipelineStage):
    """Undoes the family's latent normalisation, decodes, and returns `[B, T, H, W, 3]`
    float32."""

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
        video = self.vae.decode(latents, return_dict=False)[0]
        frames = (video * 0.5 + 0.5).clamp(0, 1)
        batch.output = frames.permute(0, 2, 3, 4, 1).float().cpu()
        return batch
