"""Our WanPipeline against diffusers' WanPipeline on the same tiny checkpoint and seed."""

from __future__ import annotations

import pytest
import torch

from fastvideo import VideoGenerator

REQUEST = dict(prompt="a cat walks across a sunny garden", negative_prompt="blurry, static",
               height=32, width=48, num_frames=5, num_inference_steps=4, guidance_scale=5.0)


def _diffusers_run(path, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(path, dtype=torch.float32)
    captured: dict[str, torch.Tensor] = {}

    def keep_latents(pipe, step, t, kwargs):
        captured["latents"] = kwargs["latents"]
        return kwargs

    frames = pipe(**REQUEST, generator=torch.Generator().manual_seed(seed), output_type="np",
                  callback_on_step_end=keep_latents).frames[0]
    return captured["latents"][0], torch.from_numpy(frames)


@pytest.mark.parametrize("checkpoint", ["tiny_wan_path", "tiny_wan_euler_path"])
def test_pipeline_matches_diffusers(checkpoint: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(checkpoint)
    seed = 1234
    ref_latents, ref_frames = _diffusers_run(path, seed)

    generator = VideoGenerator.from_pretrained(path, device="cpu")
    result = generator.generate_video(**REQUEST, seed=seed)

    assert result.frames.shape == (5, 32, 48, 3) and result.frames.dtype == torch.float32
    assert result.latents.shape == ref_latents.shape
    # fp32 on CPU: the two implementations order a few reductions differently, so allow
    # 1e-4 relative L2 on the latents after 4 steps and 1e-3 on decoded pixels in [0, 1].
    rel_l2 = (result.latents - ref_latents).norm() / ref_latents.norm()
    assert rel_l2 <= 1e-4, f"latents relative L2 {rel_l2:.2e}"
    max_diff = (result.frames - ref_frames).abs().max().item()
    assert max_diff <= 1e-3, f"frames max abs diff {max_diff:.2e}"
    assert set(result.timings) >= {"text_encoding_stage", "denoising_stage", "decoding_stage"}


def test_different_seed_gives_different_video(tiny_wan_path) -> None:
    generator = VideoGenerator.from_pretrained(tiny_wan_path, device="cpu")
    a = generator.generate_video(**REQUEST, seed=1)
    b = generator.generate_video(**REQUEST, seed=2)
    again = generator.generate_video(**REQUEST, seed=1)
    assert not torch.allclose(a.latents, b.latents)
    assert torch.equal(a.latents, again.latents)


def test_batched_guidance_equals_two_forwards(tiny_wan_path) -> None:
    """`batch_cfg` runs each step's conditional and unconditional inputs as one batch of
    2; the video is that of two forwards per step (diffusers' way, the default on one
    device)."""
    paired = VideoGenerator.from_pretrained(tiny_wan_path, device="cpu", batch_cfg=True)
    batch_sizes: list[int] = []
    paired.pipeline.get_module("transformer").register_forward_pre_hook(
        lambda module, args, kwargs: batch_sizes.append(kwargs["hidden_states"].shape[0]),
        with_kwargs=True)
    a = paired.generate_video(**REQUEST, seed=3)
    separate = VideoGenerator.from_pretrained(tiny_wan_path, device="cpu", batch_cfg=False)
    b = separate.generate_video(**REQUEST, seed=3)
    assert batch_sizes == [2] * REQUEST["num_inference_steps"]
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=1e-5)
    assert not torch.equal(a.latents, torch.zeros_like(a.latents))


@pytest.mark.parametrize(("guidance_end", "batch_cfg", "expected"), [
    (1.0, True, [2]),  # the paired context, once
    (0.5, True, [1, 2]),  # the prompt's alone for the steps after guidance, and paired
    (1.0, False, [1, 1]),  # each branch's, once
], ids=["paired", "guidance-end", "two-forwards"])
def test_the_text_keys_and_values_are_computed_once_per_video(
        tiny_wan_path, guidance_end: float, batch_cfg: bool, expected: list[int]) -> None:
    """The denoising loop prepares the blocks' cross-attention keys and values of each
    context it uses once, not at every step: the first block's `to_k` sees the text that
    often (batch sizes), whatever the number of steps."""
    generator = VideoGenerator.from_pretrained(tiny_wan_path, device="cpu",
                                               batch_cfg=batch_cfg)
    dit = generator.pipeline.get_module("transformer")
    batch_sizes: list[int] = []
    dit.blocks[0].attn2.to_k.register_forward_hook(
        lambda module, args, out: batch_sizes.append(out.shape[0]))
    generator.generate_video(**REQUEST, seed=3, guidance_end=guidance_end)
    assert REQUEST["num_inference_steps"] >= 2 and batch_sizes == expected


def test_guidance_texts_of_different_lengths_run_as_two_forwards(tiny_wan_path) -> None:
    """Embeddings that cannot be stacked (here the negative cut to 8 tokens) fall back to
    two forwards per step, with the result of `batch_cfg=False`."""
    from fastvideo.fastvideo_args import FastVideoArgs
    from fastvideo.forward_batch import ForwardBatch
    from fastvideo.pipelines.builder import build_pipeline

    pipeline = build_pipeline(FastVideoArgs(model_path=str(tiny_wan_path), device="cpu"))
    args = pipeline.fastvideo_args
    request = {k: v for k, v in REQUEST.items() if k != "prompt"}
    batch = ForwardBatch(prompt=[REQUEST["prompt"]], seed=5, **{**request,
                         "negative_prompt": [request["negative_prompt"]]})
    for name in ("input_validation_stage", "text_encoding_stage",
                 "timestep_preparation_stage", "latent_preparation_stage"):
        batch = pipeline.get_stage(name)(batch, args)
    batch.negative_prompt_embeds = batch.negative_prompt_embeds[:, :8]
    stage = pipeline.get_stage("denoising_stage")
    batch_sizes: list[int] = []
    stage.transformer.register_forward_pre_hook(
        lambda module, a, kwargs: batch_sizes.append(kwargs["hidden_states"].shape[0]),
        with_kwargs=True)
    start = {"latents": batch.latents.clone(), "step_index": 0}
    paired = stage(batch, args).latents.clone()
    assert batch_sizes == [1, 1] * REQUEST["num_inference_steps"]
    stage.batch_cfg = False
    batch.latents, batch.step_index = start["latents"], start["step_index"]
    assert torch.equal(stage(batch, args).latents, paired)
