"""`Engine.preload`: our own modules built on a thread while the caller imports, taken and
finished by the next pipeline of the same settings, with the same result as loading them
there; errors on the thread reach that pipeline."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.forward_batch import ForwardBatch
from fastvideo.jobs import engine as engine_module
from fastvideo.jobs.engine import READ_AHEAD_ENV, Engine
from fastvideo.models.loader.weight_utils import WeightFileError

REQUEST = dict(prompt="a red circle", negative_prompt="blur", height=32, width=32,
               num_frames=5, num_inference_steps=3, guidance_scale=3.0, seed=4)


def _args(path: Path, **options) -> FastVideoArgs:
    return FastVideoArgs(model_path=str(path), device="cpu", dtype="fp32", **options)


def _video(engine: Engine, args: FastVideoArgs) -> torch.Tensor:
    pipeline = engine.pipeline(args)
    return pipeline.forward(ForwardBatch(**REQUEST), args).output


def test_preloaded_modules_are_built_on_the_thread_and_give_the_same_video(
        tiny_wan_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built: dict[str, tuple[str, object]] = {}
    read = engine_module.read_component

    def recording_read(name, *args):
        module = read(name, *args)
        built[name] = (threading.current_thread().name, module)
        return module

    monkeypatch.setattr(engine_module, "read_component", recording_read)
    args = _args(tiny_wan_path)
    engine = Engine()
    # The components our classes implement; the VAE, tokenizer and scheduler are diffusers'
    # and transformers' (loaded by the pipeline, after the caller's imports).
    assert engine.preload(args) == ["text_encoder", "transformer"]
    assert engine.preload(args) == []  # already on their way: not read twice
    video = _video(engine, args)
    assert {name: thread for name, (thread, _) in built.items()} == {
        "text_encoder": "fastvideo-preload", "transformer": "fastvideo-preload"}
    pipeline = engine.pipeline(args)
    for name, (_, module) in built.items():
        assert pipeline.get_module(name) is module
    assert [(b["loaded"], b["preloaded"]) for b in engine.builds] == [
        (["scheduler", "text_encoder", "tokenizer", "transformer", "vae"],
         ["text_encoder", "transformer"])]
    torch.testing.assert_close(video, _video(Engine(), args), rtol=0, atol=0)


def test_preloaded_dit_is_finished_by_the_pipeline(tiny_wan_path: Path) -> None:
    """Compiling and attention backends are the pipeline's part, on its own thread."""
    args = _args(tiny_wan_path, enable_torch_compile=True, attention_backend="TORCH_SDPA")
    engine = Engine()
    engine.preload(args)
    dit = engine.pipeline(args).get_module("transformer")
    assert all(block._compiled_call_impl is not None for block in dit.blocks)


def test_an_error_on_the_thread_is_raised_by_the_pipeline(tiny_wan_path: Path,
                                                          tmp_path: Path) -> None:
    ckpt = Path(shutil.copytree(tiny_wan_path, tmp_path / "ckpt"))
    weights = ckpt / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    engine = Engine()
    args = _args(ckpt)
    assert engine.preload(args) == ["text_encoder", "transformer"]
    with pytest.raises(WeightFileError, match=str(weights)):
        engine.pipeline(args)
    # Taken once: the next build loads afresh and reports the same file.
    with pytest.raises(WeightFileError, match=str(weights)):
        engine.pipeline(args)


def test_preload_can_be_switched_off_and_names_what_it_cannot_read(
        tiny_wan_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = _args(tiny_wan_path)
    with pytest.raises(ValueError, match=r"cannot preload 'unet'.*lists no such component"):
        Engine().preload(args, ["unet"])
    monkeypatch.setenv(READ_AHEAD_ENV, "0")
    engine = Engine()
    assert engine.preload(args) == []
    assert engine.builds == []
