"""LatentPreparationStage: the initial noise, drawn exactly as the reference draws it."""

from __future__ import annotations

import torch

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.forward_batch import NOISE_ROWS_KEY, ForwardBatch
from fastvideo.pipelines.stages.base import PipelineStage
from fastvideo.pipelines.stages.geometry import LatentGeometry


class LatentPreparationStage(PipelineStage):
    """Float32 `randn` of shape (B, C, T, H, W) from a CPU generator seeded with `seed`.

    Drawing on the CPU makes the noise, and so the video, the same on every device.
    """

    reads = ("prompt",)
    writes = ("latents",)

    def __init__(self, geometry: LatentGeometry) -> None:
        self.geometry = geometry

    def forward(self, batch: ForwardBatch, fastvideo_args: FastVideoArgs) -> ForwardBatch:
        if batch.latents is not None:
            return batch
        # A slice of a larger request (data parallelism) draws the whole request's noise
        # and keeps its rows, so each item's noise is the same however the request is split.
        first, total = batch.extra.get(NOISE_ROWS_KEY, (0, batch.batch_size))
        if not (0 <= first and first + batch.batch_size <= total):
            raise ValueError(f"extra[{NOISE_ROWS_KEY!r}]={[first, total]} does not hold the "
                             f"batch's {batch.batch_size} items")
        shape = self.geometry.latent_shape(total, batch.height, batch.width, batch.num_frames)
        generator = torch.Generator("cpu").manual_seed(batch.seed)
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        if total != batch.batch_size:
            noise = noise[first:first + batch.batch_size].clone()  # not a view of all rows
        batch.latents = noise.to(fastvideo_args.device)
        batch.step_index = 0
        return batch
