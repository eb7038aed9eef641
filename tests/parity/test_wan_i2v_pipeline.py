"""Our WanImageToVideoPipeline against diffusers' on the same tiny I2V checkpoint, seed and
image; and the ways an image reaches it (PIL, path, store URI) or is refused."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastvideo import VideoGenerator
from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.forward_batch import ForwardBatch

REQUEST = dict(prompt="a cat walks across a sunny garden", negative_prompt="blurry, static",
               height=32, width=48, num_frames=5, num_inference_steps=4, guidance_scale=5.0)


def _image(seed: int = 0) -> Image.Image:
    """Random RGB pixels, not the video's size or aspect: both the CLIP processor's and the
    first frame's resizing take part."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def generator(tiny_wan_i2v_path: Path) -> VideoGenerator:
    return VideoGenerator.from_pretrained(tiny_wan_i2v_path, device="cpu")


@pytest.fixture(scope="module")
def diffusers_pipe(tiny_wan_i2v_path: Path):
    import diffusers.pipelines.wan.pipeline_wan_i2v as reference
    from diffusers import WanImageToVideoPipeline

    # Unlike its T2V sibling, diffusers' I2V pipeline calls ftfy whether or not it is
    # installed (it is not here); our prompt cleaning, like the T2V pipeline without ftfy,
    # skips it, and for these ASCII prompts fix_text is the identity anyway.
    if not hasattr(reference, "ftfy"):
        reference.ftfy = types.SimpleNamespace(fix_text=lambda text: text)
    return WanImageToVideoPipeline.from_pretrained(tiny_wan_i2v_path, dtype=torch.float32)


def test_pipeline_matches_diffusers(generator: VideoGenerator, diffusers_pipe) -> None:
    seed, image = 1234, _image()
    captured: dict[str, torch.Tensor] = {}

    def keep_latents(pipe, step, t, kwargs):
        captured["latents"] = kwargs["latents"]
        return kwargs

    ref_frames = torch.from_numpy(diffusers_pipe(
        image=image, **REQUEST, generator=torch.Generator().manual_seed(seed), output_type="np",
        callback_on_step_end=keep_latents).frames[0])
    ref_latents = captured["latents"][0]

    result = generator.generate_video(**REQUEST, seed=seed, image=image)

    assert result.frames.shape == (5, 32, 48, 3) and result.latents.shape == ref_latents.shape
    # As for T2V (tests/parity/test_wan_pipeline.py): fp32 on CPU, a few reductions ordered
    # differently, so 1e-4 relative L2 on the latents after 4 steps, 1e-3 on pixels in [0, 1].
    rel_l2 = (result.latents - ref_latents).norm() / ref_latents.norm()
    assert rel_l2 <= 1e-4, f"latents relative L2 {rel_l2:.2e}"
    max_diff = (result.frames - ref_frames).abs().max().item()
    assert max_diff <= 1e-3, f"frames max abs diff {max_diff:.2e}"
    assert {"image_encoding_stage", "image_conditioning_stage"} <= set(result.timings)


def test_conditioning_and_noise_match_diffusers(generator: VideoGenerator,
                                                diffusers_pipe) -> None:
    """Stage by stage, for two prompts sharing one image: CLIP tokens, the conditioning
    channels and the initial noise (drawn as for T2V) against diffusers' own functions."""
    pipeline, args = generator.pipeline, generator.fastvideo_args
    image, seed = _image(), 7
    batch = ForwardBatch(prompt=["a cat", "a dog"], seed=seed, height=32, width=48,
                         num_frames=9, num_inference_steps=2, image_pixels=torch.from_numpy(
                             np.array(image)))
    for name in ("input_validation_stage", "text_encoding_stage", "image_loading_stage",
                 "image_encoding_stage", "image_conditioning_stage",
                 "timestep_preparation_stage", "latent_preparation_stage"):
        batch = pipeline.get_stage(name)(batch, args)

    ref_embeds = diffusers_pipe.encode_image(image, "cpu").repeat(2, 1, 1)
    frame = diffusers_pipe.video_processor.preprocess(image, height=32, width=48)
    ref_noise, ref_condition = diffusers_pipe.prepare_latents(
        frame, 2, 4, 32, 48, 9, torch.float32, "cpu", torch.Generator().manual_seed(seed))

    assert batch.image_embeds.shape == (2, 17, 24)  # 16 patches + class token, CLIP width
    torch.testing.assert_close(batch.image_embeds, ref_embeds, rtol=0, atol=1e-6)
    assert batch.condition_latents.shape == (2, 2 + 4, 5, 8, 12)  # mask, then latents
    # Same VAE on the same input: only kernel scheduling may differ, so 1e-6.
    torch.testing.assert_close(batch.condition_latents, ref_condition, rtol=0, atol=1e-6)
    assert torch.equal(batch.latents, ref_noise)


def test_image_as_pil_path_and_uri_give_the_same_video(generator: VideoGenerator,
                                                       tmp_path: Path) -> None:
    request = {**REQUEST, "num_inference_steps": 2, "seed": 3}
    image = _image()
    image.save(tmp_path / "first.png")
    from_pil = generator.generate_video(**request, image=image)
    for source in (str(tmp_path / "first.png"), tmp_path / "first.png",
                   (tmp_path / "first.png").as_uri()):
        result = generator.generate_video(**request, image=source)
        assert torch.equal(result.latents, from_pil.latents), source
    other = generator.generate_video(**request, image=_image(seed=1))
    assert not torch.allclose(other.latents, from_pil.latents)  # the image is used


def test_batched_guidance_equals_two_forwards(tiny_wan_i2v_path: Path) -> None:
    """With `batch_cfg` both guidance branches, each with the image context and the
    conditioning channels, run as one batch of 2; the video is that of two forwards."""
    generator = VideoGenerator.from_pretrained(tiny_wan_i2v_path, device="cpu", batch_cfg=True)
    calls: list[tuple[int, int, int]] = []
    hook = generator.pipeline.get_module("transformer").register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(
            (*kwargs["hidden_states"].shape[:2], len(kwargs["context_kv"][0]))),
        with_kwargs=True)
    request = {**REQUEST, "num_inference_steps": 2, "seed": 11, "image": _image()}
    try:
        paired = generator.generate_video(**request)
    finally:
        hook.remove()
    separate = VideoGenerator.from_pretrained(tiny_wan_i2v_path, device="cpu", batch_cfg=False)
    # A batch of 2; noise + mask + image latents; every block's keys and values of the text
    # and of the image (prepared once for the loop).
    assert calls == [(2, 4 + 2 + 4, 4)] * 2
    torch.testing.assert_close(paired.latents, separate.generate_video(**request).latents,
                               rtol=0, atol=1e-5)


def test_image_to_video_model_needs_an_image(generator: VideoGenerator) -> None:
    with pytest.raises(ValueError, match=r"WanImageToVideoPipeline makes a video from an image, "
                                         r"but the request has no image"):
        generator.generate_video(**REQUEST)


def test_text_to_video_model_refuses_an_image(tiny_wan_path: Path) -> None:
    from fastvideo.pipelines.builder import build_pipeline

    # Built without loading weights: the check runs before any model does.
    args = FastVideoArgs(model_path=str(tiny_wan_path), device="cpu")
    t2v = VideoGenerator(args, pipeline=build_pipeline(args, required_modules=()))
    with pytest.raises(ValueError, match=r"WanPipeline takes no image, but the request has one"):
        t2v.generate_video(**REQUEST, image=_image())


def test_bad_image_fails_before_any_model_runs(generator: VideoGenerator,
                                               tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"notes\.png is not an image file"):
        generator.generate_video(**REQUEST, image=str(tmp_path / "notes.png"))
    with pytest.raises(FileNotFoundError, match=r"missing\.png does not exist"):
        generator.generate_video(**REQUEST, image=str(tmp_path / "missing.png"))


def test_cli_generates_from_an_image_and_makes_an_i2v_model(tmp_path: Path,
                                                            tiny_wan_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    import json

    from fastvideo.entrypoints.cli import main as cli_main

    model = tmp_path / "tiny-i2v"
    assert cli_main(["make-tiny-model", "--kind", "wan-i2v", "--output", str(model)]) == 0
    index = json.loads((model / "model_index.json").read_text())
    assert index["_class_name"] == "WanImageToVideoPipeline" and "image_encoder" in index
    _image().save(tmp_path / "first.png")
    options = ["--prompt", "a cat", "--device", "cpu", "--height", "32", "--width", "48",
               "--num-frames", "5", "--num-inference-steps", "2"]
    assert cli_main(["generate", "--model-path", str(model), "--image",
                     str(tmp_path / "first.png"), "--output-path", str(tmp_path / "videos"),
                     *options]) == 0
    assert len(list((tmp_path / "videos").glob("*.mp4"))) == 1
    # A text-to-video model given an image: a one-line error, exit status 2.
    capsys.readouterr()
    assert cli_main(["generate", "--model-path", str(tiny_wan_path), "--image",
                     str(tmp_path / "first.png"), "--output-path", str(tmp_path / "t2v"),
                     *options]) == 2
    assert "WanPipeline takes no image" in capsys.readouterr().err
