"""A model family's defaults live with the family: request defaults and fps on its
pipeline class, prompt cleaning and latent normalisation injected into generic stages."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from fastvideo.fastvideo_args import FastVideoArgs, SamplingParam
from fastvideo.pipelines.builder import build_pipeline
from fastvideo.pipelines.stages.latent_normalization import LatentNormalization
from fastvideo.pipelines.wan import family
from fastvideo.pipelines.wan.wan_pipeline import WanPipeline
from tasks.dispatch import Dispatch
from tasks.prepare import request_defaults


def test_run_defaults_are_the_familys_under_what_is_given(tiny_wan_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    defaults, fps = request_defaults(str(tiny_wan_path), Dispatch(), {"height": 64, "seed": 3})
    assert (defaults.height, defaults.width, defaults.num_frames, fps) == (64, 832, 81, 16)
    assert defaults.seed == 3
    # Another family's defaults (here: Wan's, changed) are what a run gets.
    monkeypatch.setattr(WanPipeline, "default_sampling",
                        dataclasses.replace(family.SAMPLING, width=96, num_inference_steps=7))
    monkeypatch.setattr(WanPipeline, "fps", 8)
    defaults, fps = request_defaults(str(tiny_wan_path), Dispatch(), {"height": None})
    assert (defaults.height, defaults.width, defaults.num_inference_steps, fps) == (480, 96, 7, 8)
    # A model only the GPU node sees: SamplingParam's own defaults.
    remote = Dispatch(mode="deployment", placement="all")
    assert request_defaults("/nowhere", remote, {})[0] == SamplingParam()
    with pytest.raises(ValueError, match="not a Diffusers model folder"):
        request_defaults("/nowhere", Dispatch(), {})


def test_generic_stages_take_the_familys_cleaning_and_normalisation(tiny_wan_path: Path) -> None:
    pipeline = build_pipeline(FastVideoArgs(model_path=str(tiny_wan_path), device="cpu"),
                              required_modules=())
    assert pipeline.get_stage("text_encoding_stage").clean is family.clean_prompt
    vae = pipeline.get_module("vae").config
    norm = pipeline.get_stage("decoding_stage").normalization
    assert norm == LatentNormalization.per_channel(vae.latents_mean, vae.latents_std)
    latents = torch.randn(1, vae.z_dim, 2, 3, 3)
    assert torch.allclose(norm.normalize(norm.denormalize(latents)), latents, atol=1e-6)
    assert family.clean_prompt("  a &amp;amp; b \n c ") == "a & b c"
    with pytest.raises(ValueError, match="differ in length"):
        LatentNormalization.per_channel([0.0, 1.0], [1.0])
