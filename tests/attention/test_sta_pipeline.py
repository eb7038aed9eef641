"""Sliding tile attention chosen through the engine options, end to end on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastvideo import VideoGenerator
from fastvideo.attention.sta_config import STAConfig

# 32x48 pixels, 5 frames -> latent (3, 8, 12) -> token grid (3, 4, 6) with patch (1, 2, 2).
REQUEST = dict(prompt="a cat walks across a sunny garden", height=32, width=48, num_frames=5,
               num_inference_steps=3, seed=5)


def _generate(path: Path, tmp_path: Path, config: STAConfig | None):
    options = {}
    if config is not None:
        config_path = tmp_path / "sta.json"
        config.save(config_path)
        options = dict(attention_backend="SLIDING_TILE_ATTN", sta_config=str(config_path))
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
