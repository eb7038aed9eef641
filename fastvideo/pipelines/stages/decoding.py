"""DecodingStage: final latents -> frames in [0, 1]."""

from __future__ import annotations

from typing import Any

import torch

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.forward_batch import ForwardBatch
from fastvideo.pipelines.stages.base import PipelineStage


class DecodingStage(PipelineStage):
    """Undoes the VAE's latent normalisation, decodes, and returns `[B, T, H, W, 3]` float32."""

    reads = ("latents",)
    writes = ("output",)

    def __init__(self, vae: Any) -> None:
        self.vae = vae

    @torch.no_grad()
    def forward(self, batch: ForwardBatch, fastvideo_args: FastVideoArgs) -> ForwardBatch:
        config = self.vae.config
        param = next(self.vae.parameters())
        latents = batch.latents.to(param.device, param.dtype)
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(config.latents_std).view(shape).to(latents.device, latents.dtype)
        video = self.vae.decode(latents / inv_std + mean, return_dict=False)[0]
        frames = (video * 0.5 + 0.5).clamp(0, 1)
        batch.output = frames.permute(0, 2, 3, 4, 1).float().cpu()
        return batch
