"""TimestepPreparationStage: the scheduler's timesteps for the requested step count."""

from __future__ import annotations

from typing import Any

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.forward_batch import ForwardBatch
from fastvideo.pipelines.stages.base import PipelineStage


class TimestepPreparationStage(PipelineStage):
    reads = ("num_inference_steps",)
    writes = ("timesteps",)

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def forward(self, batch: ForwardBatch, fastvideo_args: FastVideoArgs) -> ForwardBatch:
        self.scheduler.set_timesteps(batch.num_inference_steps, device=fastvideo_args.device)
        batch.timesteps = self.scheduler.timesteps.clone()
        return batch
