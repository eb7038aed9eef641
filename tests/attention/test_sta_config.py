"""STAConfig: window lookup per (step, layer, head), JSON round trip, bad values."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest

from fastvideo.attention.sta_config import STAConfig, choose_tile_size

WINDOWS = {3: [[(1, 2, 3), None], [(3, 3, 3), (5, 1, 1)]],
           4: [[None, None], [(1, 1, 1), (1, 1, 1)]]}


def test_lookup_per_step_layer_and_head() -> None:
    config = STAConfig(tile_size=(2, 8, 8), num_full_steps=3, default_window=(3, 3, 3),
                       windows=WINDOWS)
    assert config.head_windows(2, 0, 2) is None  # a full-attention step
    assert config.head_windows(3, 0, 2) == ((1, 2, 3), None)
    assert config.head_windows(3, 1, 2) == ((3, 3, 3), (5, 1, 1))
    assert config.head_windows(4, 0, 2) is None  # every head dense
    assert config.head_windows(9, 0, 2) == ((3, 3, 3), (3, 3, 3))  # default_window
    assert STAConfig(windows=WINDOWS).head_windows(9, 0, 2) is None  # no default: dense
    with pytest.raises(ValueError, match="has no layer index"):
        config.head_windows(3, None, 2)
    assert config.head_windows(9, None, 2) == ((3, 3, 3), (3, 3, 3))
    with pytest.raises(ValueError, match="lists 2 layers at step 3; asked for layer 2"):
        config.head_windows(3, 2, 2)
    with pytest.raises(ValueError, match="lists 2 heads for step 3 layer 0; the model has 4"):
        config.head_windows(3, 0, 4)


def test_json_round_trip(tmp_path: Path) -> None:
    config = STAConfig(tile_size=(4, 8, 4), num_full_steps=3, default_window=None,
                       windows=WINDOWS, video_attends_text=False)
    path = config.save(tmp_path / "sta.json")
    loaded = STAConfig.load(path)
    assert loaded == config
    assert json.loads(path.read_text())["windows"]["3"] == [[[1, 2, 3], None], [[3, 3, 3], [5, 1, 1]]]
    assert STAConfig.load(STAConfig().save(tmp_path / "default.json")) == STAConfig()
    assert json.loads((tmp_path / "default.json").read_text())["tile_size"] == "auto"


def _padded_tokens(grid, tile, block=128) -> int:
    return math.prod(-(-n // t) for n, t in zip(grid, tile)) * block


@pytest.mark.parametrize("grid, expected", [((21, 30, 52), (3, 6, 7)),   # Wan 480p, 81 frames
                                            ((21, 45, 80), (3, 5, 8)),   # Wan 720p
                                            ((1, 30, 52), (1, 9, 13))])  # one frame
def test_auto_tile_pads_least_among_compact_tiles(grid, expected) -> None:
    tile = choose_tile_size(grid)
    assert tile == expected and STAConfig().tile_for(grid) == tile
    assert STAConfig(tile_size=(2, 8, 8)).tile_for(grid) == (2, 8, 8)
    t, h, w = tile
    assert t * h * w <= 128 and max(h, w) <= 2 * min(h, w) and t <= max(h, w)
    assert all(-(-n // s) >= min(4, n) for n, s in zip(grid, tile))
    # Against every compact tile, by brute force over the same constraints.
    for cand in itertools.product(*(range(1, min(n, 128) + 1) for n in grid)):
        ct, ch, cw = cand
        if (ct * ch * cw <= 128 and max(ch, cw) <= 2 * min(ch, cw) and ct <= max(ch, cw)
                and all(-(-n // s) >= min(4, n) for n, s in zip(grid, cand))):
            assert _padded_tokens(grid, tile) <= _padded_tokens(grid, cand), cand
    if grid == (21, 30, 52):  # 9% padding, against 20% for the 128-token (2, 8, 8)
        assert _padded_tokens(grid, tile) / math.prod(grid) < 1.1
        assert _padded_tokens(grid, (2, 8, 8)) / math.prod(grid) > 1.2


def test_windows_larger_than_a_grid_are_accepted() -> None:
    # The config knows no latent shape; attention clamps each window to the grid it runs on.
    assert STAConfig(default_window=(99, 99, 99)).head_windows(0, 0, 1) == ((99, 99, 99),)


@pytest.mark.parametrize("kwargs, match", [
    (dict(tile_size=(0, 8, 8)), r"tile_size must be three positive ints"),
    (dict(tile_size=(2, 8)), r"tile_size must be three positive ints"),
    (dict(tile_size="Auto"), r"tile_size must be \"auto\" or three positive ints"),
    (dict(default_window=(1, 1, 1.5)), r"default_window must be three positive ints"),
    (dict(num_full_steps=-1), r"num_full_steps must be an int >= 0"),
    (dict(windows={0: [[(1, 1, 1), (1, -1, 1)]]}), r"windows\[0\]\[0\]\[1\] must be three"),
    (dict(windows={-2: []}), r"windows keys must be steps"),
])
def test_bad_values_raise(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        STAConfig(**kwargs)


def test_bad_json_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown STA config keys \['tile'\]"):
        STAConfig.from_dict({"tile": [1, 2, 3]})
    with pytest.raises(ValueError, match="windows keys must be step numbers, got 'first'"):
        STAConfig.from_dict({"windows": {"first": []}})
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"default_window": [3, 3]}))
    with pytest.raises(ValueError, match="default_window must be three positive ints"):
        STAConfig.load(path)
