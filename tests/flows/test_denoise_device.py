"""Where denoising runs is the GPU node's business, not the (maybe GPU-less) flow machine's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastvideo.entrypoints.video_generator import VideoGenerator
from fastvideo.fastvideo_args import SamplingParam
from fastvideo.jobs.item_phases import denoise_item
from fastvideo.pipelines.wan.wan_pipeline import DENOISE
from tasks.dispatch import Dispatch
from tasks.prepare import prepare_run


def _ctx(model: Path, tmp_path: Path, **options):
    return prepare_run.fn(str(model), str(tmp_path), str(tmp_path), SamplingParam(), **options)


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Behave as the GPU-less machine a flow often runs on, also where CUDA exists."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.usefixtures("no_gpu")
def test_remote_denoise_defaults_to_cuda_bf16(tiny_wan_path: Path, tmp_path: Path) -> None:
    local = _ctx(tiny_wan_path, tmp_path)
    remote = _ctx(tiny_wan_path, tmp_path,
                  dispatch=Dispatch(mode="deployment", placement="denoise"))
    assert (local.device, local.dtype) == ("cpu", "float32")
    assert (local.denoise_device, local.denoise_dtype) == ("cpu", "float32")
    assert (remote.device, remote.dtype) == ("cpu", "float32")
    assert (remote.denoise_device, remote.denoise_dtype) == ("cuda", "bfloat16")
    # A bf16 GPU result never answers for a fp32 CPU one: different checkpoint keys.
    assert (denoise_item(local, DENOISE, "a", []).output_key
            != denoise_item(remote, DENOISE, "a", []).output_key)


@pytest.mark.usefixtures("no_gpu")
def test_explicit_denoise_device_wins(tiny_wan_path: Path, tmp_path: Path) -> None:
    ctx = _ctx(tiny_wan_path, tmp_path, denoise_device="cpu",
               dispatch=Dispatch(mode="deployment", placement="denoise"))
    assert (ctx.denoise_device, ctx.denoise_dtype) == ("cpu", "float32")


@pytest.mark.usefixtures("no_gpu")
def test_cuda_on_a_machine_without_it_fails_clearly(tiny_wan_path: Path) -> None:
    with pytest.raises(ValueError, match=r"device 'cuda' was requested but this machine has no "
                                         r"usable CUDA GPU"):
        VideoGenerator.from_pretrained(tiny_wan_path, device="cuda")
