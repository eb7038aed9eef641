"""The shapes generator and the prompt-adherence scorer on clean and degraded clips."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from fastvideo.training.scorer import accuracy, detect, score
from fastvideo.training.shapes_data import (
    Attributes,
    all_combinations,
    parse_caption,
    random_scene,
    render_batch,
    render_scene,
    split_combinations,
    to_model_input,
)


def _scenes(n: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    return [random_scene(rng, all_combinations()) for _ in range(n)]


def test_caption_round_trip_and_bad_caption():
    for attrs in all_combinations():
        assert parse_caption(attrs.caption()) == attrs
    assert parse_caption("A  Red circle moves UP on a black background").direction == "up"
    with pytest.raises(ValueError, match="does not read"):
        parse_caption("a red circle jumps")
    with pytest.raises(ValueError, match="'pink'"):
        parse_caption("a pink circle moves up on a black background")
    with pytest.raises(ValueError, match="invisible"):
        Attributes("blue", "square", "up", "blue")


def test_split_holds_out_combinations_not_values():
    train, held = split_combinations(0.1, seed=0)
    assert not set(train) & set(held) and len(held) == round(0.1 * len(all_combinations()))
    for name in ("colour", "shape", "direction", "background"):
        assert {getattr(a, name) for a in held} <= {getattr(a, name) for a in train}
    assert split_combinations(0.1, seed=0) == (train, held)  # seeded


def test_render_is_seeded_and_in_frame():
    a, b = _scenes(8, seed=3), _scenes(8, seed=3)
    assert a == b
    video = render_batch(a, 9, 32, 32)
    assert video.shape == (8, 9, 32, 32, 3) and video.dtype == torch.uint8
    assert torch.equal(video[0], render_scene(a[0], 9, 32, 32))
    x = to_model_input(video)
    assert x.shape == (8, 3, 9, 32, 32) and x.min() >= -1.0 and x.max() <= 1.0


def _degrade(clip: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur (3x3 box) then Gaussian noise of std 0.05, in [0, 1]."""
    x = clip.float().permute(0, 3, 1, 2) / 255.0
    x = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    x = x + 0.05 * torch.randn(x.shape, generator=generator)
    return x.clamp(0, 1).permute(0, 2, 3, 1)


@pytest.mark.parametrize(("size", "count"), [(32, 300), (64, 100)])
def test_scorer_on_clean_clips(size, count):
    scenes = _scenes(count, seed=size)
    clean = accuracy(list(render_batch(scenes, 9, size, size)), scenes)
    # Clean clips: the detector is exact up to rare pixel-grid ties.
    assert min(clean.values()) >= 0.99, clean


def test_scorer_degrades_gracefully():
    # 32x32 is the hard case: a shape ~10 px across loses its corners to the blur.
    scenes = _scenes(200, seed=7)
    generator = torch.Generator().manual_seed(0)
    clips = [_degrade(c, generator) for c in render_batch(scenes, 9, 32, 32)]
    noisy = accuracy(clips, [s.caption() for s in scenes])
    assert min(noisy[k] for k in ("colour", "shape", "direction", "background")) >= 0.9, noisy


def test_score_value_ranges():
    scene = _scenes(1, seed=5)[0]
    clip = render_scene(scene, 9, 32, 32)
    unit = clip.float() / 255.0
    assert score(unit, scene)["all"]
    assert score(unit * 2 - 1, scene.attributes, value_range=(-1.0, 1.0))["all"]
    with pytest.raises(ValueError, match="value_range"):
        detect(unit * 2 - 1)  # [-1, 1] read as [0, 1]
    blank = torch.zeros(9, 32, 32, 3)
    found = detect(blank)
    assert found.colour is None and found.shape is None and found.background == "black"
    assert not score(blank, scene)["all"]
