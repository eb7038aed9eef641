"""Our HunyuanVideoPipeline (our DiT and text encoders) against diffusers'
HunyuanVideoPipeline on the same tiny checkpoint and seed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastvideo import VideoGenerator
from fastvideo.fastvideo_args import SamplingParam
from fastvideo.forward_batch import ForwardBatch
from fastvideo.pipelines.hunyuan import family
from fastvideo.pipelines.stages import InputValidationStage, LatentGeometry, PromptTemplate

SIZE = dict(height=32, width=48, num_frames=5, num_inference_steps=3)
PROMPT = "a cat walks across a sunny garden"


def _diffusers_run(path: Path, seed: int, **request: object) -> tuple[torch.Tensor, torch.Tensor]:
    from diffusers import HunyuanVideoPipeline

    pipe = HunyuanVideoPipeline.from_pretrained(path, dtype=torch.float32)
    pipe.vae.enable_tiling()
    captured: dict[str, torch.Tensor] = {}

    def keep_latents(pipe, step, t, kwargs):
        captured["latents"] = kwargs["latents"]
        return kwargs

    # No crop_start: diffusers counts the template's tokens itself, as our stage does.
    frames = pipe(prompt=PROMPT, **SIZE, **request, prompt_template={
        "template": family.PROMPT_TEMPLATE.template}, generator=torch.Generator().manual_seed(seed),
        output_type="np", callback_on_step_end=keep_latents).frames[0]
    return captured["latents"][0], torch.from_numpy(frames)


@pytest.mark.parametrize("guidance", ["embedded", "true_cfg"])
def test_pipeline_matches_diffusers(tiny_hunyuan_path: Path, guidance: str) -> None:
    seed = 1234
    if guidance == "embedded":  # the family's way: no negative branch, guidance 6.0 embedded
        ours_request: dict[str, object] = {}
        ref_request: dict[str, object] = {"guidance_scale": 6.0}
    else:  # true CFG (diffusers' true_cfg_scale) on top of a non-default embedded guidance
        ours_request = dict(guidance_scale=4.0, negative_prompt="blurry, static",
                            embedded_guidance_scale=3.5)
        ref_request = dict(true_cfg_scale=4.0, negative_prompt="blurry, static",
                           guidance_scale=3.5)
    ref_latents, ref_frames = _diffusers_run(tiny_hunyuan_path, seed, **ref_request)

    generator = VideoGenerator.from_pretrained(str(tiny_hunyuan_path), device="cpu",
                                               dtype="fp32")
    modules = generator.pipeline.modules
    assert type(modules["transformer"]).__module__ == "fastvideo.models.dits.hunyuanvideo"
    assert modules["vae"].use_tiling
    result = generator.generate_video(PROMPT, **SIZE, **ours_request, seed=seed)

    assert result.frames.shape == (5, 32, 48, 3)
    assert result.latents.shape == ref_latents.shape == (4, 2, 4, 6)
    # fp32 on CPU: different implementations order reductions differently, so allow 1e-4
    # relative L2 on the latents after 3 steps and 1e-3 on decoded pixels in [0, 1].
    rel_l2 = (result.latents - ref_latents).norm() / ref_latents.norm()
    assert rel_l2 <= 1e-4, f"latents relative L2 {rel_l2:.2e}"
    max_diff = (result.frames - ref_frames).abs().max().item()
    assert max_diff <= 1e-3, f"frames max abs diff {max_diff:.2e}"


def test_resumed_denoise_equals_uninterrupted(tiny_hunyuan_path: Path) -> None:
    """A denoise resumed mid-loop (another process: the scheduler set up again) re-derives
    the family's noise levels, and ends where an uninterrupted loop does."""
    from fastvideo.fastvideo_args import FastVideoArgs
    from fastvideo.pipelines.builder import build_pipeline
    from tests.pipelines.denoise_snapshots import denoise_with_snapshots

    args = FastVideoArgs(model_path=str(tiny_hunyuan_path), device="cpu", dtype="fp32")
    pipeline = build_pipeline(args)
    batch = ForwardBatch(prompt=PROMPT, **SIZE, guidance_scale=1.0, seed=5,
                         max_sequence_length=32, embedded_guidance_scale=6.0)
    denoise, whole, snapshots = denoise_with_snapshots(pipeline, batch, args)
    resumed = denoise(snapshots[1], args)
    assert resumed.step_index == whole.step_index == SIZE["num_inference_steps"]
    torch.testing.assert_close(resumed.latents, whole.latents, rtol=0, atol=0)


def test_family_defaults_and_template_crop(tiny_hunyuan_path: Path) -> None:
    from transformers import AutoTokenizer

    defaults = family.SAMPLING
    assert (defaults.height, defaults.width, defaults.num_frames, defaults.num_inference_steps,
            defaults.guidance_scale, defaults.embedded_guidance_scale,
            defaults.max_sequence_length, family.FPS) == (720, 1280, 129, 50, 1.0, 6.0, 256, 24)
    tokenizer = AutoTokenizer.from_pretrained(tiny_hunyuan_path / "tokenizer")
    # diffusers' own count: the whole template's tokens less `{}` and the final <|eot_id|>.
    whole = len(tokenizer(family.PROMPT_TEMPLATE.template).input_ids)
    assert family.PROMPT_TEMPLATE.crop_for(tokenizer) == whole - 2
    with pytest.raises(ValueError, match=f"crop_start=500 exceeds the {whole - 2} tokens"):
        PromptTemplate(template=family.PROMPT_TEMPLATE.template, crop_start=500).crop_for(
            tokenizer)


def test_bad_inputs_are_refused_with_their_values() -> None:
    with pytest.raises(ValueError, match="exactly one '{}'"):
        PromptTemplate(template="no placeholder here")
    with pytest.raises(ValueError, match="crop_start must be >= 0, got -1"):
        PromptTemplate(template="{}", crop_start=-1)
    with pytest.raises(ValueError, match="embedded_guidance_scale must be .* got -2"):
        SamplingParam(embedded_guidance_scale=-2.0)
    # A family whose DiT takes no embedded guidance (Wan's) refuses one given.
    stage = InputValidationStage(LatentGeometry(8, 4, 16, (1, 2, 2)))
    batch = ForwardBatch(prompt="a cat", height=32, width=32, num_frames=5,
                         embedded_guidance_scale=6.0)
    with pytest.raises(ValueError, match="embedded_guidance_scale=6.0 is for guidance-"):
        stage.forward(batch, None)  # type: ignore[arg-type]


def test_cli_writes_the_tiny_model(tmp_path: Path) -> None:
    import json

    from fastvideo.entrypoints.cli import main as cli_main

    assert cli_main(["make-tiny-model", "--kind", "hunyuan", "--output", str(tmp_path)]) == 0
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "HunyuanVideoPipeline"
    assert index["transformer"] == ["diffusers", "HunyuanVideoTransformer3DModel"]
