"""Stages check the ForwardBatch fields they read and write, and time themselves."""

from __future__ import annotations

import time

import pytest
import torch

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.forward_batch import ForwardBatch
from fastvideo.pipelines.stages import (
    DecodingStage,
    DenoisingStage,
    PipelineStage,
    StageContractError,
)

ARGS = FastVideoArgs(model_path="unused", device="cpu")


class ForgetfulStage(PipelineStage):
    reads = ("prompt",)
    writes = ("latents",)

    def forward(self, batch: ForwardBatch, fastvideo_args: FastVideoArgs) -> ForwardBatch:
        return batch


def test_missing_input_field_is_named() -> None:
    stage = DenoisingStage(transformer=None, scheduler=None)
    stage.stage_name = "denoising_stage"
    with pytest.raises(StageContractError,
                       match=r"denoising_stage needs ForwardBatch.prompt_embeds, which is not set"):
        stage(ForwardBatch(prompt=["x"]), ARGS)


def test_decoding_without_latents_names_the_field() -> None:
    with pytest.raises(StageContractError, match=r"DecodingStage needs ForwardBatch.latents"):
        DecodingStage(vae=None, normalization=None)(ForwardBatch(prompt=["x"]), ARGS)


def test_unwritten_output_field_is_named() -> None:
    with pytest.raises(StageContractError,
                       match=r"ForgetfulStage was expected to set ForwardBatch.latents"):
        ForgetfulStage()(ForwardBatch(prompt=["x"]), ARGS)


def test_declared_fields_exist_on_the_batch() -> None:
    from fastvideo.pipelines import stages

    names = set(ForwardBatch.field_names())
    for stage_cls in (getattr(stages, n) for n in stages.__all__):
        if isinstance(stage_cls, type) and issubclass(stage_cls, PipelineStage):
            assert set(stage_cls.reads) <= names, stage_cls
            assert set(stage_cls.writes) <= names, stage_cls


class QueuingStage(PipelineStage):
    writes = ("latents",)

    def forward(self, batch: ForwardBatch, fastvideo_args: FastVideoArgs) -> ForwardBatch:
        batch.latents = torch.zeros(1)
        return batch


class SlowStream:
    """A CUDA stream whose queued work takes `seconds` to finish."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.waits = seconds, 0

    def synchronize(self) -> None:
        self.waits += 1
        time.sleep(self.seconds)


def test_stage_time_includes_its_queued_gpu_work(monkeypatch: pytest.MonkeyPatch) -> None:
    # Kernels queued without a host sync finish after `forward` returns: the stage waits
    # for this thread's stream, so its time is the GPU's, not the next thing's.
    stream = SlowStream(0.2)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    batch = QueuingStage()(ForwardBatch(prompt=["x"]), ARGS)
    assert stream.waits == 1
    assert batch.timings["QueuingStage"] >= 0.2


def test_stage_without_cuda_waits_for_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_stream",
                        lambda device=None: pytest.fail("no CUDA: no stream to wait for"))
    batch = QueuingStage()(ForwardBatch(prompt=["x"]), ARGS)
    assert batch.timings["QueuingStage"] < 0.2
