"""A pipeline that loads only some modules: stand-ins for the rest, stages that need them fail."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.forward_batch import ForwardBatch
from fastvideo.pipelines.builder import build_pipeline, build_pipeline_for_stages
from fastvideo.pipelines.composed_pipeline_base import ModuleNotLoadedError, UnloadedModule


@pytest.fixture(scope="module")
def args(tiny_wan_path: Path) -> FastVideoArgs:
    return FastVideoArgs(model_path=str(tiny_wan_path), device="cpu")


def _loaded(pipeline) -> list[str]:
    return sorted(n for n, m in pipeline.modules.items() if not isinstance(m, UnloadedModule))


def test_only_the_required_modules_load(args: FastVideoArgs) -> None:
    full = build_pipeline(args)
    dit_only = build_pipeline(args, required_modules=["transformer", "scheduler"])
    assert _loaded(dit_only) == ["scheduler", "transformer"]
    # Shapes still come from the configs of the modules left out (no weights read).
    assert dit_only.geometry == full.geometry
    assert list(dit_only.stages) == list(full.stages)
    assert dit_only.stage_modules(["denoising_stage"]) == ["scheduler", "transformer"]
    assert full.stage_modules(["input_validation_stage", "text_encoding_stage"]) == \
        ["text_encoder", "tokenizer"]

    batch = ForwardBatch(prompt=["a cat"], latents=torch.zeros(1, 4, 3, 8, 8))
    with pytest.raises(ModuleNotLoadedError, match="'vae' is not loaded"):
        dit_only.get_stage("decoding_stage")(batch, args)


def test_unknown_required_module(args: FastVideoArgs) -> None:
    with pytest.raises(ValueError, match=r"\['unet'\] are not modules of WanPipeline"):
        build_pipeline(args, required_modules=["unet"])


def test_pipeline_for_stages_reuses_given_modules(args: FastVideoArgs) -> None:
    text = build_pipeline_for_stages(args, ["input_validation_stage", "text_encoding_stage"])
    assert _loaded(text) == ["text_encoder", "tokenizer"]
    again = build_pipeline_for_stages(args, ["text_encoding_stage", "decoding_stage"],
                                      modules=text.modules)
    assert _loaded(again) == ["text_encoder", "tokenizer", "vae"]
    assert again.modules["text_encoder"] is text.modules["text_encoder"]

    full = build_pipeline(args, modules={"text_encoder": text.modules["text_encoder"]})
    batch = ForwardBatch(prompt=["a cat walks"], guidance_scale=1.0, height=32, width=32,
                         num_frames=5, max_sequence_length=16)
    with torch.no_grad():
        for name in ("input_validation_stage", "text_encoding_stage"):
            batch = text.get_stage(name)(batch, args)
        expected = full.get_stage("text_encoding_stage")(
            ForwardBatch(prompt=["a cat walks"], guidance_scale=1.0, max_sequence_length=16),
            args)
    assert torch.equal(batch.prompt_embeds, expected.prompt_embeds)
