"""Sliding tile attention chosen through the engine options, end to end on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastvideo import VideoGenerator
from fastvideo.attention.sta_config import STAConfig
from fastvideo.entrypoints.cli import _build_parser
from fastvideo.entrypoints.cli import main as cli_main
from fastvideo.fastvideo_args import FastVideoArgs

# 32x48 pixels, 5 frames -> latent (3, 8, 12) -> token grid (3, 4, 6) with patch (1, 2, 2).
REQUEST = dict(prompt="a cat walks across a sunny garden", height=32, width=48, num_frames=5,
               num_inference_steps=3, seed=5)


def _generate(path: Path, tmp_path: Path, config: STAConfig | None, **options):
    if config is not None:
        config_path = tmp_path / "sta.json"
        config.save(config_path)
        options.update(attention_backend="SLIDING_TILE_ATTN", sta_config=str(config_path))
    return VideoGenerator.from_pretrained(path, device="cpu", **options).generate_video(**REQUEST)


@pytest.fixture(scope="module")
def dense(tiny_wan_path: Path, tmp_path_factory: pytest.TempPathFactory):
    return _generate(tiny_wan_path, tmp_path_factory.mktemp("dense"), None)


def test_whole_grid_window_equals_dense(tiny_wan_path: Path, tmp_path: Path, dense) -> None:
    config = STAConfig(tile_size=(1, 2, 2), default_window=(3, 2, 3))  # covers the 3x2x3 tiles
    sta = _generate(tiny_wan_path, tmp_path, config)
    torch.testing.assert_close(sta.latents, dense.latents, rtol=0, atol=1e-5)


def test_small_window_changes_the_result_after_the_full_steps(tiny_wan_path: Path,
                                                               tmp_path: Path, dense) -> None:
    sparse = _generate(tiny_wan_path, tmp_path,
                       STAConfig(tile_size=(1, 2, 2), default_window=(1, 1, 1)))
    assert (sparse.latents - dense.latents).abs().max() > 1e-3
    # Every step dense: the windows never apply.
    all_full = _generate(tiny_wan_path, tmp_path, STAConfig(
        tile_size=(1, 2, 2), default_window=(1, 1, 1), num_full_steps=REQUEST["num_inference_steps"]))
    torch.testing.assert_close(all_full.latents, dense.latents, rtol=0, atol=1e-5)


def test_compiled_sta_pipeline_matches_eager(tiny_wan_path: Path, tmp_path: Path) -> None:
    """`--compile` with STA (its attention one custom op in each compiled block): the same
    video as eager STA, one dense step then sparse ones."""
    config = STAConfig(tile_size=(1, 2, 2), default_window=(1, 1, 1), num_full_steps=1)
    eager = _generate(tiny_wan_path, tmp_path, config)
    compiled = _generate(tiny_wan_path, tmp_path, config, enable_torch_compile=True)
    # Inductor fuses fp32 element-wise ops differently: 1e-4 on the latents, as for dense.
    torch.testing.assert_close(compiled.latents, eager.latents, rtol=0, atol=1e-4)


def test_sta_config_alone_selects_sliding_tile(tiny_wan_path: Path, tmp_path: Path) -> None:
    config = STAConfig(tile_size=(1, 2, 2), default_window=(1, 1, 1))
    path = str(config.save(tmp_path / "sta.json"))
    args = FastVideoArgs(model_path=str(tiny_wan_path), device="cpu", sta_config=path)
    assert args.attention_backend == "SLIDING_TILE_ATTN"
    implicit = VideoGenerator.from_pretrained(tiny_wan_path, device="cpu",
                                              sta_config=path).generate_video(**REQUEST)
    explicit = _generate(tiny_wan_path, tmp_path, config)
    torch.testing.assert_close(implicit.latents, explicit.latents, rtol=0, atol=0)
    with pytest.raises(ValueError, match="used by the SLIDING_TILE_ATTN backend only, but "
                                         "attention_backend='TORCH_SDPA'"):
        FastVideoArgs(model_path=str(tiny_wan_path), attention_backend="TORCH_SDPA",
                      sta_config=path)
    with pytest.raises(ValueError, match="missing.json' is not a file"):
        FastVideoArgs(model_path=str(tiny_wan_path), sta_config=str(tmp_path / "missing.json"))


def test_command_line_engine_options(tiny_wan_path: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`fastvideo generate` takes the STA config, the compile switch and the step cache."""
    path = STAConfig(tile_size=(1, 2, 2), default_window=(3, 2, 3)).save(tmp_path / "sta.json")
    args = _build_parser().parse_args([
        "generate", "--model-path", str(tiny_wan_path), "--prompt", REQUEST["prompt"],
        "--output-path", str(tmp_path), "--sta-config", str(path), "--enable-torch-compile"])
    assert (args.sta_config, args.enable_torch_compile) == (str(path), True)
    assert args.batch_cfg is None  # unset: FastVideoArgs' default (batched guidance) applies
    assert args.step_cache_threshold is None and args.guidance_end is None
    no_batch = _build_parser().parse_args([
        "generate", "--model-path", str(tiny_wan_path), "--prompt", REQUEST["prompt"],
        "--output-path", str(tmp_path), "--no-batch-cfg", "--step-cache-threshold", "0.1",
        "--guidance-end", "0.5"])
    assert (no_batch.batch_cfg, no_batch.step_cache_threshold, no_batch.guidance_end) == \
        (False, 0.1, 0.5)
    # A bad threshold is refused before any model loads, naming the option.
    assert cli_main(["generate", "--model-path", str(tiny_wan_path), "--prompt", "x",
                     "--output-path", str(tmp_path), "--step-cache-threshold", "0"]) == 2
    assert "step_cache_threshold must be a finite number > 0" in capsys.readouterr().err
    assert cli_main(["generate", "--model-path", str(tiny_wan_path), "--prompt",
                     REQUEST["prompt"], "--output-path", str(tmp_path / "videos"),
                     "--device", "cpu", "--sta-config", str(path), "--height", "32",
                     "--width", "48", "--num-frames", "5", "--num-inference-steps", "3",
                     "--seed", "5"]) == 0
    assert len(list((tmp_path / "videos").glob("*.mp4"))) == 1
