"""Which window Sliding Tile Attention uses for each (denoising step, layer, head).

A window is a number of tiles along (t, h, w) around the query's tile. The config does not
know the latent shape (every request may have another), so a window larger than a grid is
clamped to the grid when attention runs: a window at least as large as the tile grid along
every axis is dense attention. `None` in place of a window means dense attention too.

JSON form (`save` / `load`), `windows` keyed by step, then a list over layers, then heads:

    {"tile_size": [2, 8, 8], "num_full_steps": 10, "default_window": null,
     "video_attends_text": true, "text_attends_video": true,
     "windows": {"10": [[[3, 3, 5], null], [[1, 3, 3], [3, 3, 3]]], "11": ...}}
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Window = tuple[int, int, int]
"""Tiles along (t, h, w)."""
LayerWindows = tuple[Window | None, ...]
"""One window per head; `None`: that head attends densely."""


def parse_window(value: Any, what: str) -> Window:
    """`value` as a window of three positive ints; ValueError naming `what` otherwise."""
    if (not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 3
            or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in value)):
        raise ValueError(f"{what} must be three positive ints (t, h, w), got {value!r}")
    return tuple(value)


def _parse_optional_window(value: Any, what: str) -> Window | None:
    return None if value is None else parse_window(value, what)


@dataclass(frozen=True, kw_only=True)
class STAConfig:
    """Tile size and windows of Sliding Tile Attention for one model and step schedule."""

    tile_size: Window | str = "auto"
    """Latent positions (after patchify) per tile along (t, h, w), or "auto": per latent grid,
    the compact tile of at most 128 positions that pads the grid least (`choose_tile_size`).
    On GPUs each tile fills one 128-token block of the FlexAttention kernel, the rest of the
    block being padding, and a grid that is not a whole number of tiles is padded too; padding
    costs compute. At Wan's 480p grid (21, 30, 52) "auto" picks (3, 6, 7): 9% padding, where
    (2, 8, 8) pads 20% and the reference STA's (6, 8, 8) 31%."""
    num_full_steps: int = 0
    """Steps `0 .. num_full_steps - 1` attend densely: early steps lay out the whole scene."""
    default_window: Window | None = None
    """Window of every (step, layer) that `windows` does not list; `None`: dense."""
    windows: Mapping[int, tuple[LayerWindows, ...]] = field(default_factory=dict)
    """Step -> one entry per layer -> one window (or `None`) per head."""
    video_attends_text: bool = True
    """Video queries attend all text keys (text tokens follow the video tokens)."""
    text_attends_video: bool = True
    """Text queries attend all video keys (they always attend the text)."""

    def __post_init__(self) -> None:
        if self.tile_size != "auto":
            if isinstance(self.tile_size, str):
                raise ValueError(f'tile_size must be "auto" or three positive ints (t, h, w), '
                                 f"got {self.tile_size!r}")
            object.__setattr__(self, "tile_size", parse_window(self.tile_size, "tile_size"))
        if (not isinstance(self.num_full_steps, int) or isinstance(self.num_full_steps, bool)
                or self.num_full_steps < 0):
            raise ValueError(f"num_full_steps must be an int >= 0, got {self.num_full_steps!r}")
        object.__setattr__(self, "default_window",
                           _parse_optional_window(self.default_window, "default_window"))
        windows: dict[int, tuple[LayerWindows, ...]] = {}
        for step, layers in self.windows.items():
            if not isinstance(step, int) or isinstance(step, bool) or step < 0:
                raise ValueError(f"windows keys must be steps (ints >= 0), got {step!r}")
            windows[step] = tuple(
                tuple(_parse_optional_window(w, f"windows[{step}][{layer}][{head}]")
                      for head, w in enumerate(heads))
                for layer, heads in enumerate(layers))
        object.__setattr__(self, "windows", windows)

    def tile_for(self, grid: Window) -> Window:
        """The tile size used on latent `grid`."""
        return resolve_tile_size(self.tile_size, grid)

    def head_windows(self, step: int, layer: int | None, num_heads: int) -> LayerWindows | None:
        """The window of each of the `num_heads` heads of `layer` at `step`; `None` when every
        head attends densely (the caller can then use a dense kernel)."""
        if step < self.num_full_steps:
            return None
        layers = self.windows.get(step)
        if layers is None:
            if self.default_window is None:
                return None
            return (self.default_window,) * num_heads
        if layer is None:
            raise ValueError(f"the STA config lists windows per layer at step {step}, but this "
                             "attention layer has no layer index (layer_idx)")
        if layer >= len(layers):
            raise ValueError(f"the STA config lists {len(layers)} layers at step {step}; "
                             f"asked for layer {layer}")
        heads = layers[layer]
        if len(heads) != num_heads:
            raise ValueError(f"the STA config lists {len(heads)} heads for step {step} layer "
                             f"{layer}; the model has {num_heads}")
        return None if all(w is None for w in heads) else heads

    @functools.cached_property
    def canonical(self) -> str:
        """The config as sorted JSON, made once per object: equal configs, equal text."""
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tile_size": self.tile_size if self.tile_size == "auto" else list(self.tile_size),
            "num_full_steps": self.num_full_steps,
            "default_window": None if self.default_window is None else list(self.default_window),
            "video_attends_text": self.video_attends_text,
            "text_attends_video": self.text_attends_video,
            "windows": {str(step): [[None if w is None else list(w) for w in heads]
                                    for heads in layers]
                        for step, layers in sorted(self.windows.items())},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> STAConfig:
        known = {"tile_size", "num_full_steps", "default_window", "video_attends_text",
                 "text_attends_video", "windows"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown STA config keys {unknown}; known: {sorted(known)}")
        kwargs = dict(data)
        if "windows" in kwargs:
            kwargs["windows"] = {_parse_step(step): layers
                                 for step, layers in kwargs["windows"].items()}
        return cls(**kwargs)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> STAConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


KERNEL_BLOCK = 128
"""Tokens per query/key block of the GPU FlexAttention kernel: one tile per block."""


def resolve_tile_size(tile_size: Window | str, grid: Window) -> Window:
    """`tile_size` as three ints: "auto" becomes `choose_tile_size(grid)`."""
    if tile_size == "auto":
        return choose_tile_size(grid)
    return parse_window(tile_size, "tile_size")


def choose_tile_size(grid: Window, block: int = KERNEL_BLOCK) -> Window:
    """The tile for latent `grid` that pads it least once every tile fills a `block`-token
    block, among compact tiles: at most `block` positions, at least 4 tiles along each axis
    (fewer only where the axis is shorter), height and width within 2x of each other, no
    longer in time than in space. Ties go to the most cube-like, then the larger tile.

    Cached: attention asks at every layer and step, and the search takes milliseconds."""
    return _choose_tile_size(parse_window(tuple(grid), "grid"), block)


@functools.lru_cache(maxsize=64)
def _choose_tile_size(grid: Window, block: int) -> Window:
    best: tuple[tuple[float, ...], Window] | None = None
    for t in range(1, min(grid[0], block) + 1):
        for h in range(1, min(grid[1], block // t) + 1):
            for w in range(1, min(grid[2], block // (t * h)) + 1):
                tiles = [-(-n // size) for n, size in zip(grid, (t, h, w))]
                if (any(n < min(4, g) for n, g in zip(tiles, grid))
                        or max(h, w) > 2 * min(h, w) or t > max(h, w)):
                    continue
                score = (tiles[0] * tiles[1] * tiles[2], max(t, h, w) / min(t, h, w), -t * h * w)
                if best is None or score < best[0]:
                    best = (score, (t, h, w))
    if best is None:  # unreachable: (1, 1, 1) always qualifies
        raise ValueError(f"no tile fits grid {grid}")
    return best[1]


def _parse_step(key: str) -> int:
    try:
        return int(key)
    except ValueError:
        raise ValueError(f"windows keys must be step numbers, got {key!r}") from None
