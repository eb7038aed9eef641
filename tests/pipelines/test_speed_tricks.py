"""Speed tricks of the denoising loop: guidance that stops after a fraction of the steps
(`guidance_end`) and TeaCache-style step caching (`step_cache_threshold`), on the tiny Wan
checkpoint, fp32 on CPU."""

from __future__ import annotations

import pytest
import torch

from fastvideo import VideoGenerator
from fastvideo.models.dits.step_cache import StepCache

REQUEST = dict(prompt="a cat walks across a sunny garden", negative_prompt="blurry, static",
               height=32, width=48, num_frames=5, num_inference_steps=4, guidance_scale=5.0)


def _count_batches(generator: VideoGenerator) -> list[int]:
    sizes: list[int] = []
    generator.pipeline.get_module("transformer").register_forward_pre_hook(
        lambda module, args, kwargs: sizes.append(kwargs["hidden_states"].shape[0]),
        with_kwargs=True)
    return sizes


def _count_block_runs(generator: VideoGenerator) -> list[int]:
    """Batch size of every run of the DiT's first block."""
    sizes: list[int] = []
    generator.pipeline.get_module("transformer").blocks[0].register_forward_pre_hook(
        lambda module, args: sizes.append(args[0].shape[0]))
    return sizes


def test_guidance_end_matches_diffusers_turning_guidance_off(tiny_wan_path) -> None:
    """`guidance_end=0.5` over 4 steps guides steps 0-1 and runs the conditional branch
    alone on steps 2-3: diffusers' WanPipeline gives the same latents when its guidance
    scale drops to 1 after step 1."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(tiny_wan_path, dtype=torch.float32)
    captured: dict[str, torch.Tensor] = {}

    def stop_guidance(pipe, step, t, kwargs):
        if step == 1:
            pipe._guidance_scale = 1.0
        captured["latents"] = kwargs["latents"]
        return kwargs

    pipe(**REQUEST, generator=torch.Generator().manual_seed(7), output_type="latent",
         callback_on_step_end=stop_guidance)
    generator = VideoGenerator.from_pretrained(tiny_wan_path, device="cpu", batch_cfg=True)
    sizes = _count_batches(generator)
    result = generator.generate_video(**REQUEST, seed=7, guidance_end=0.5)
    assert sizes == [2, 2, 1, 1]
    ref = captured["latents"][0]
    rel_l2 = (result.latents - ref).norm() / ref.norm()
    assert rel_l2 <= 1e-4, f"latents relative L2 {rel_l2:.2e}"
    guided = generator.generate_video(**REQUEST, seed=7)
    assert (result.latents - guided.latents).norm() / guided.latents.norm() > 1e-3


def test_guidance_end_zero_is_no_guidance(tiny_wan_path) -> None:
    generator = VideoGenerator.from_pretrained(tiny_wan_path, device="cpu")
    sizes = _count_batches(generator)
    off = generator.generate_video(**REQUEST, seed=3, guidance_end=0.0)
    assert sizes == [1] * 4
    unguided = generator.generate_video(**{**REQUEST, "guidance_scale": 1.0}, seed=3)
    assert torch.equal(off.latents, unguided.latents)


def test_guided_step_count() -> None:
    from fastvideo.pipelines.stages.denoising import guided_step_count

    assert [guided_step_count(end, 10) for end in (0.0, 0.3, 0.25, 0.5, 0.7, 1.0)] == \
        [0, 3, 3, 5, 7, 10]
    assert guided_step_count(0.5, 3) == 2 and guided_step_count(1.0, 50) == 50
    assert guided_step_count(0.14, 50) == 7  # 0.14 x 50 is 7.000000000000001 in floats


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "half"])
def test_guidance_end_out_of_range_is_refused(tiny_wan_path, bad) -> None:
    generator = VideoGenerator.from_pretrained(tiny_wan_path, device="cpu")
    with pytest.raises(ValueError, match=r"guidance_end must be a number in \[0, 1\]"):
        generator.generate_video(**REQUEST, guidance_end=bad)


def test_step_cache_input_is_what_the_first_block_modulates(tiny_wan_path) -> None:
    """The indicator compared from step to step is the first block's modulated input."""
    generator = VideoGenerator.from_pretrained(tiny_wan_path, device="cpu")
    dit = generator.pipeline.get_module("transformer")
    seen: list[torch.Tensor] = []
    dit.blocks[0].norm1.register_forward_hook(lambda module, args, out: seen.append(out))
    latents = torch.randn(2, dit.config.in_channels, 2, 4, 6,
                          generator=torch.Generator().manual_seed(0))
    timestep = torch.tensor([900.0, 400.0])
    text = torch.randn(2, 7, dit.config.text_dim)
    with torch.no_grad():
        dit(hidden_states=latents, encoder_hidden_states=text, timestep=timestep)
        indicator = dit.step_cache_input(latents, timestep)
    torch.testing.assert_close(indicator, seen[0], rtol=0, atol=0)


def test_step_cache_off_by_a_tiny_threshold_changes_nothing(tiny_wan_path) -> None:
    plain = VideoGenerator.from_pretrained(tiny_wan_path, device="cpu", batch_cfg=True)
    reference = plain.generate_video(**REQUEST, seed=11)
    cached = VideoGenerator.from_pretrained(tiny_wan_path, device="cpu", batch_cfg=True,
                                            step_cache_threshold=1e-12)
    runs = _count_block_runs(cached)
    result = cached.generate_video(**REQUEST, seed=11)
    assert runs == [2] * 4  # every step ran its blocks (guidance batched)
    assert torch.equal(result.latents, reference.latents)


def test_step_cache_reuses_residuals_between_first_and_last_step(tiny_wan_path) -> None:
    """A threshold no change reaches: only the first and last steps run the blocks; the
    others add the first step's residual. Without batched guidance each branch keeps its
    own residual (same decisions)."""
    request = {**REQUEST, "num_inference_steps": 6}
    reference = VideoGenerator.from_pretrained(tiny_wan_path, device="cpu").generate_video(
        **request, seed=5)
    for batch_cfg, expected in ((True, [2, 2]), (False, [1, 1, 1, 1])):
        cached = VideoGenerator.from_pretrained(tiny_wan_path, device="cpu", batch_cfg=batch_cfg,
                                                step_cache_threshold=1e9)
        runs = _count_block_runs(cached)
        result = cached.generate_video(**request, seed=5)
        assert runs == expected, batch_cfg
        assert torch.isfinite(result.latents).all()
        assert not torch.allclose(result.latents, reference.latents, atol=1e-4)


def test_step_cache_with_guidance_ending_runs_the_new_branch(tiny_wan_path) -> None:
    """When guidance stops, the conditional-only branch has no residual yet: it runs its
    blocks once, then reuses them."""
    cached = VideoGenerator.from_pretrained(tiny_wan_path, device="cpu", batch_cfg=True,
                                            step_cache_threshold=1e9)
    runs = _count_block_runs(cached)
    cached.generate_video(**{**REQUEST, "num_inference_steps": 6}, seed=5, guidance_end=0.5)
    # Step 0 paired (2), steps 1-2 reuse it, step 3 first conditional-only (1), step 4
    # reuses, step 5 (last) runs.
    assert runs == [2, 1, 1]


def test_step_cache_decisions() -> None:
    cache = StepCache(threshold=0.25)
    base = torch.ones(1, 4, 8)
    decisions = [cache.decide(i, 6, base * (1 + 0.1 * i)) for i in range(6)]
    # Changes 0.1, 0.09, 0.08, ...: sums 0.1, 0.19 reuse; 0.27 runs (reset); 0.07 reuse; last runs.
    assert decisions == [False, True, True, False, True, False]


HUNYUAN_REQUEST = dict(prompt="a cat walks", height=32, width=32, num_frames=5,
                       num_inference_steps=6)


def test_hunyuan_step_cache_input_is_what_the_first_block_modulates(tiny_hunyuan_path) -> None:
    generator = VideoGenerator.from_pretrained(tiny_hunyuan_path, device="cpu")
    dit = generator.pipeline.get_module("transformer")
    seen: list[torch.Tensor] = []
    dit.transformer_blocks[0].norm1.register_forward_hook(
        lambda module, args, out: seen.append(out[0]))
    cfg = dit.config
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, cfg.in_channels, 2, 4, 4, generator=g),
                  timestep=torch.tensor([700.0]),
                  pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
                  guidance=torch.tensor([6000.0]))
    with torch.no_grad():
        dit(**inputs, encoder_hidden_states=torch.randn(1, 5, cfg.text_embed_dim, generator=g),
            encoder_attention_mask=torch.ones(1, 5))
        indicator = dit.step_cache_input(**inputs)
    torch.testing.assert_close(indicator, seen[0], rtol=0, atol=0)


def test_hunyuan_step_cache(tiny_hunyuan_path) -> None:
    """HunyuanVideo (embedded guidance: one branch): a threshold no change stays under runs
    every step as without the cache; one no change reaches runs the first and last."""
    reference = VideoGenerator.from_pretrained(tiny_hunyuan_path, device="cpu").generate_video(
        **HUNYUAN_REQUEST, seed=2)
    counts = {}
    for threshold in (1e-12, 1e9):
        generator = VideoGenerator.from_pretrained(tiny_hunyuan_path, device="cpu",
                                                   step_cache_threshold=threshold)
        runs: list[int] = []
        generator.pipeline.get_module("transformer").transformer_blocks[0] \
            .register_forward_pre_hook(lambda module, args, runs=runs: runs.append(1))
        result = generator.generate_video(**HUNYUAN_REQUEST, seed=2)
        counts[threshold] = len(runs)
        if threshold < 1:
            assert torch.equal(result.latents, reference.latents)
        else:
            assert torch.isfinite(result.latents).all()
            assert not torch.allclose(result.latents, reference.latents, atol=1e-4)
    assert counts == {1e-12: 6, 1e9: 2}


def test_step_cache_needs_a_dit_that_supports_it() -> None:
    from fastvideo.models.dits.step_cache import check_supported

    class PlainDiT(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="step_cache_threshold=0.1 needs a DiT that supports "
                                         "step caching .*PlainDiT does not: unset it"):
        check_supported(PlainDiT, 0.1)


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), True])
def test_step_cache_threshold_must_be_positive(tiny_wan_path, bad) -> None:
    with pytest.raises(ValueError, match="step_cache_threshold must be a finite number > 0"):
        VideoGenerator.from_pretrained(tiny_wan_path, device="cpu", step_cache_threshold=bad)



def test_step_cache_resumed_mid_loop_runs_its_first_step(tiny_wan_path) -> None:
    """A denoise resumed from a mid-loop checkpoint has no residual: its first step runs
    the blocks, the rest follow the threshold; with a threshold nothing stays under, the
    resumed loop ends where an uninterrupted one does."""
    from fastvideo.fastvideo_args import FastVideoArgs
    from fastvideo.forward_batch import ForwardBatch
    from fastvideo.pipelines.builder import build_pipeline
    from tests.pipelines.denoise_snapshots import denoise_with_snapshots

    request = {k: v for k, v in REQUEST.items() if k != "prompt"}
    request.update(num_inference_steps=6, negative_prompt=[REQUEST["negative_prompt"]])
    for threshold, expected_runs in ((1e9, [2, 2]), (1e-12, [2, 2, 2, 2])):
        args = FastVideoArgs(model_path=str(tiny_wan_path), device="cpu", batch_cfg=True,
                             step_cache_threshold=threshold)
        pipeline = build_pipeline(args)
        batch = ForwardBatch(prompt=[REQUEST["prompt"]], seed=9, **request)
        denoise, whole, snapshots = denoise_with_snapshots(pipeline, batch, args)
        runs: list[int] = []
        handle = denoise.transformer.blocks[0].register_forward_pre_hook(
            lambda module, a, runs=runs: runs.append(a[0].shape[0]))
        resumed = denoise(snapshots[2], args)  # steps 2..5
        handle.remove()
        assert runs == expected_runs, threshold  # 1e9: the first (step 2) and the last
        if threshold < 1:
            torch.testing.assert_close(resumed.latents, whole.latents, rtol=0, atol=0)
