"""TimestepPreparationStage: the scheduler's timesteps for the requested step count."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.forward_batch import ForwardBatch
from fastvideo.pipelines.stages.base import PipelineStage

SigmaSchedule = Callable[[int], Sequence[float]]
"""A family's noise levels for a step count, given to the scheduler in place of its own
spacing (HunyuanVideo's reference passes `linspace(1, 0, steps + 1)[:-1]`)."""


def set_timesteps(scheduler: Any, num_steps: int, device: str,
                  sigmas: SigmaSchedule | None) -> None:
    """The scheduler's timesteps for `num_steps`, from `sigmas` when the family has them."""
    if sigmas is None:
        scheduler.set_timesteps(num_steps, device=device)
    else:
        scheduler.set_timesteps(sigmas=list(sigmas(num_steps)), device=device)


class TimestepPreparationStage(PipelineStage):
    reads = ("num_inference_steps",)
    writes = ("timesteps",)

    def __init__(self, scheduler: Any, sigmas: SigmaSchedule | None = None) -> None:
        self.scheduler = scheduler
        self.sigmas = sigmas

    def forward(self, batch: ForwardBatch, fastvideo_args: FastVideoArgs) -> ForwardBatch:
        set_timesteps(self.scheduler, batch.num_inference_steps, fastvideo_args.device,
                      self.sigmas)
        batch.timesteps = self.scheduler.timesteps.clone()
        return batch
