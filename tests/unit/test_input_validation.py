"""Bad requests fail early with a message saying what is allowed."""

from __future__ import annotations

import math

import pytest

from fastvideo.fastvideo_args import FastVideoArgs, SamplingParam
from fastvideo.forward_batch import ForwardBatch
from fastvideo.pipelines.stages import InputValidationStage, LatentGeometry

# Factors of a real Wan2.1 checkpoint: VAE 8x spatial, 4x temporal; DiT patch (1, 2, 2).
GEOMETRY = LatentGeometry(spatial_factor=8, temporal_factor=4, latent_channels=16,
                          patch_size=(1, 2, 2))
ARGS = FastVideoArgs(model_path="unused", device="cpu")


def _validate(**fields) -> ForwardBatch:
    batch = ForwardBatch(**{"prompt": "a cat", **fields})
    return InputValidationStage(GEOMETRY)(batch, ARGS)


def test_valid_request_is_normalised() -> None:
    batch = _validate(prompt="a cat", negative_prompt="blurry", height=480, width=832,
                      num_frames=81)
    assert batch.prompt == ["a cat"] and batch.negative_prompt == ["blurry"]
    assert _validate(prompt=["a", "b"]).negative_prompt == ["", ""]


@pytest.mark.parametrize(("fields", "message"), [
    ({"height": 484}, r"height=484 must be a multiple of 16 \(VAE spatial factor 8 x patch size 2\)"),
    ({"width": 840}, r"width=840 must be a multiple of 16"),
    ({"num_frames": 80}, r"num_frames=80 must be of the form k\*4\+1 .* e.g. 77 or 81"),
    ({"num_frames": 0}, r"num_frames must be a positive integer, got 0"),
    ({"prompt": []}, r"prompt must be a non-empty"),
    ({"prompt": [1, 2]}, r"prompt must be a string or a list of strings"),
    ({"num_inference_steps": -3}, r"num_inference_steps must be a positive integer, got -3"),
    ({"guidance_scale": math.nan}, r"guidance_scale must be a finite number >= 0, got nan"),
    ({"prompt": ["a", "b"], "negative_prompt": ["x", "y", "z"]},
     r"negative_prompt has 3 entries but prompt has 2"),
])
def test_bad_request_raises(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _validate(**fields)


@pytest.mark.parametrize(("fields", "message"), [
    ({"num_inference_steps": -1}, "num_inference_steps must be a positive integer, got -1"),
    ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number, got nan"),
    ({"seed": -5}, r"seed must be an integer in \[0, 2\*\*63\), got -5"),
    ({"height": 0}, "height must be a positive integer, got 0"),
])
def test_bad_sampling_param_raises(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParam(**fields)


@pytest.mark.parametrize(("fields", "message"), [
    ({"dtype": "fp8"}, r"unknown dtype 'fp8'; known: \["),
    ({"num_gpus": 0}, "num_gpus must be >= 1, got 0"),
    ({"num_gpus": 4, "sp_size": 3}, r"num_gpus=4 must be a multiple of sp_size x tp_size \(3 x 1\)"),
])
def test_bad_engine_args_raise(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FastVideoArgs(model_path="m", device="cpu", **fields)


def test_engine_dtype_defaults_follow_device() -> None:
    assert FastVideoArgs(model_path="m", device="cpu").dtype == "float32"
    assert FastVideoArgs(model_path="m", device="cuda").dtype == "bfloat16"
