"""`PipelineStage`: one step of a pipeline, a function of a `ForwardBatch`."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.forward_batch import ForwardBatch


class StageContractError(ValueError):
    """A stage was given a batch without a field it reads, or failed to write one."""


class PipelineStage(ABC):
    """Base class of every stage.

    A stage declares the `ForwardBatch` fields it needs (`reads`) and the ones it
    fills (`writes`). `__call__` checks both around `forward`, so a pipeline wired
    in the wrong order fails with the name of the missing field instead of a
    `NoneType` error deep inside a model, and it records the stage's wall time in
    `batch.timings`, up to the end of its GPU work (`wait_for_queued_work`).
    """

    reads: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[str, ...]] = ()
    # Set by `ComposedPipelineBase.add_stage`; names the stage in errors and timings.
    stage_name: str | None = None

    @property
    def name(self) -> str:
        return self.stage_name or type(self).__name__

    def verify_input(self, batch: ForwardBatch) -> None:
        for field_name in self.reads:
            if getattr(batch, field_name, None) is None:
                raise StageContractError(
                    f"{self.name} needs ForwardBatch.{field_name}, which is not set; "
                    f"run the stage that writes it first")

    def verify_output(self, batch: ForwardBatch) -> None:
        for field_name in self.writes:
            if getattr(batch, field_name, None) is None:
                raise StageContractError(
                    f"{self.name} was expected to set ForwardBatch.{field_name} but did not")

    def __call__(self, batch: ForwardBatch, fastvideo_args: FastVideoArgs) -> ForwardBatch:
        self.verify_input(batch)
        start = time.perf_counter()
        batch = self.forward(batch, fastvideo_args)
        wait_for_queued_work()
        batch.timings[self.name] = batch.timings.get(self.name, 0.0) + time.perf_counter() - start
        self.verify_output(batch)
        return batch

    @abstractmethod
    def forward(self, batch: ForwardBatch, fastvideo_args: FastVideoArgs) -> ForwardBatch:
        """Read `reads` from the batch, compute, write `writes`, return the batch."""


def wait_for_queued_work() -> None:
    """Wait for the kernels this thread queued on its CUDA stream (no-op without CUDA).

    A stage's host code returns once its kernels are queued; a denoising loop without
    host syncs runs most of a step ahead of the GPU. Waiting at the stage's end makes its
    time the GPU's (not the next step's, such as a checkpoint write's), and a GPU fault
    is raised by the stage that caused it. Only this thread's stream: another lane's work
    (a decode beside the denoising) runs on.
    """
    if torch.cuda.is_initialized():
        torch.cuda.current_stream().synchronize()
