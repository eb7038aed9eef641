"""ImageConditioningStage: the first frame -> the DiT's extra input channels (Wan2.1 I2V)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.forward_batch import ForwardBatch
from fastvideo.pipelines.stages.base import PipelineStage
from fastvideo.pipelines.stages.geometry import LatentGeometry
from fastvideo.pipelines.stages.latent_normalization import LatentNormalization
from fastvideo.utils.image_io import pixels_to_image


def image_to_frame(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """`[1, 3, height, width]` float32 in [-1, 1]: the image stretched to the video size with
    Lanczos, as diffusers' `VideoProcessor.preprocess` makes the first frame."""
    resized = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    pixels = torch.from_numpy(np.array(resized).astype(np.float32) / 255.0)
    return pixels.permute(2, 0, 1).unsqueeze(0) * 2.0 - 1.0


class ImageConditioningStage(PipelineStage):
    """Builds `condition_latents` `[B, temporal_factor + C, T, H, W]` as diffusers'
    `WanImageToVideoPipeline.prepare_latents` does:

    * a mask with one channel per video frame a latent frame covers: 1 on the first
      latent frame (given), 0 after (to generate);
    * the VAE's latents (the distribution's mode, no sampling) of the image followed by
      `num_frames - 1` black frames, normalised as the family's latents are.

    It draws no noise, so the initial noise (`LatentPreparationStage`) is the same as
    text-to-video's for the same seed.
    """

    reads = ("prompt", "image_pixels")
    writes = ("condition_latents",)

    def __init__(self, vae: Any, geometry: LatentGeometry,
                 normalization: LatentNormalization) -> None:
        self.vae = vae
        self.geometry = geometry
        self.normalization = normalization

    @torch.no_grad()
    def forward(self, batch: ForwardBatch, fastvideo_args: FastVideoArgs) -> ForwardBatch:
        height, width, num_frames = batch.height, batch.width, batch.num_frames
        frame = image_to_frame(pixels_to_image(batch.image_pixels), height, width)
        video = torch.cat([frame.unsqueeze(2), frame.new_zeros(1, 3, num_frames - 1, height, width)],
                          dim=2)
        param = next(self.vae.parameters())
        latents = self.vae.encode(video.to(param.device, param.dtype)).latent_dist.mode()
        expected = self.geometry.latent_shape(1, height, width, num_frames)
        if tuple(latents.shape) != expected:
            raise ValueError(
                f"the VAE encoded {num_frames} frames into latents {tuple(latents.shape)}, but the "
                f"video's latents are {expected}; the Wan VAE encodes frames in chunks of 4 after "
                "the first, so use num_frames of the form 4k+1")
        device = fastvideo_args.device
        latents = self.normalization.normalize(latents.to(device, torch.float32))
        # diffusers builds this by repeating the first frame's mask `temporal_factor` times and
        # folding frames into channels; every channel of latent frame 0 is 1, the rest 0.
        mask = torch.zeros(1, self.geometry.temporal_factor, *expected[2:], device=device)
        mask[:, :, 0] = 1.0
        condition = torch.cat([mask, latents], dim=1)
        batch.condition_latents = condition.repeat(batch.batch_size, 1, 1, 1, 1)
        return batch
