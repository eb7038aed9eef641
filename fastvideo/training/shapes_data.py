"""Procedural videos of one coloured shape moving over a flat background, with captions.

The vocabulary is small on purpose: a tiny model can learn it in minutes, and a plain
detector (`scorer.py`) can check a generated clip against its prompt. Held-out
combinations (`split_combinations`) are never rendered for training, so prompt adherence
on them measures composition, not memory.

Rendering is batched torch on any device, so a GPU training loop draws fresh clips at
no cost; clips are uint8 `[T, H, W, 3]` (`render_scene`) or the VAE's float range
(`to_model_input`).
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass

import torch

# Saturated, far apart in RGB, so the nearest-colour test stays right under blur and noise.
OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 190, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
    "purple": (150, 40, 200),
    "orange": (250, 130, 20),
}
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (10, 10, 10),
    "grey": (128, 128, 128),
    "white": (245, 245, 245),
    "blue": (30, 70, 230),
    "green": (30, 190, 50),
}
SHAPES = ("circle", "square", "triangle", "diamond")
DIRECTIONS = ("left", "right", "up", "down")
DIRECTION_PHRASES = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
# Unit step per direction in image coordinates (y grows downwards).
_STEPS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}


@dataclass(frozen=True)
class Attributes:
    """What a caption says: the four things the scorer checks."""

    colour: str
    shape: str
    direction: str
    background: str

    def __post_init__(self) -> None:
        for value, known in ((self.colour, OBJECT_COLOURS), (self.shape, SHAPES),
                             (self.direction, DIRECTIONS), (self.background, BACKGROUND_COLOURS)):
            if value not in known:
                raise ValueError(f"unknown attribute {value!r}; known: {list(known)}")
        if self.colour == self.background:
            raise ValueError(
                f"a {self.colour} shape on a {self.background} background is invisible")

    def caption(self) -> str:
        return (f"a {self.colour} {self.shape} moves {DIRECTION_PHRASES[self.direction]} "
                f"on a {self.background} background")


@dataclass(frozen=True)
class Scene:
    """One clip: its attributes and where the shape is. Lengths are fractions of the frame side."""

    attributes: Attributes
    size: float
    """Half the side of the shape's bounding box."""
    start_x: float
    """Centre of the shape in the first frame."""
    start_y: float
    distance: float
    """How far the centre travels from the first frame to the last."""

    def caption(self) -> str:
        return self.attributes.caption()

    def centre(self, t: float) -> tuple[float, float]:
        """Centre at time `t` in [0, 1] (first to last frame)."""
        dx, dy = _STEPS[self.attributes.direction]
        return (self.start_x + dx * self.distance * t, self.start_y + dy * self.distance * t)


_CAPTION = re.compile(
    r"a (?P<colour>\w+) (?P<shape>\w+) moves (?P<direction>to the left|to the right|up|down) "
    r"on a (?P<background>\w+) background")


def parse_caption(caption: str) -> Attributes:
    """The attributes a caption names; the inverse of `Attributes.caption`."""
    match = _CAPTION.fullmatch(" ".join(caption.lower().split()))
    if match is None:
        raise ValueError(f"caption {caption!r} does not read 'a <colour> <shape> moves "
                         f"<to the left|to the right|up|down> on a <colour> background'")
    direction = {phrase: name for name, phrase in DIRECTION_PHRASES.items()}[match["direction"]]
    return Attributes(match["colour"], match["shape"], direction, match["background"])


def all_combinations() -> list[Attributes]:
    """Every valid caption, in a fixed order."""
    return [Attributes(c, s, d, b) for c, s, d, b in itertools.product(
        OBJECT_COLOURS, SHAPES, DIRECTIONS, BACKGROUND_COLOURS) if c != b]


def split_combinations(held_out_fraction: float = 0.1,
                       seed: int = 0) -> tuple[list[Attributes], list[Attributes]]:
    """(train, held-out): a seeded split of `all_combinations`; every single attribute value
    still occurs in training, only some combinations of them never do."""
    if not 0.0 <= held_out_fraction < 0.5:
        raise ValueError(f"held_out_fraction {held_out_fraction} must be in [0, 0.5)")
    combos = all_combinations()
    order = list(range(len(combos)))
    random.Random(seed).shuffle(order)
    held = set(order[: round(held_out_fraction * len(combos))])
    train = [c for i, c in enumerate(combos) if i not in held]
    return train, [c for i, c in enumerate(combos) if i in held]


def random_scene(rng: random.Random, choices: list[Attributes]) -> Scene:
    """A scene with attributes from `choices` and a random size, start and travel that keep
    the whole shape inside the frame in every frame."""
    attributes = rng.choice(choices)
    size = rng.uniform(0.14, 0.2)
    distance = rng.uniform(0.25, 0.4)
    margin = size + 0.04
    dx, dy = _STEPS[attributes.direction]

    def start(step: float) -> float:  # the travel axis leaves room ahead of the shape
        low = margin + (distance if step < 0 else 0.0)
        high = 1.0 - margin - (distance if step > 0 else 0.0)
        return rng.uniform(low, high)

    return Scene(attributes, size, start(dx), start(dy), distance)


def _palette_tensor(names: list[str], palette: dict[str, tuple[int, int, int]],
                    device: torch.device | str) -> torch.Tensor:
    return torch.tensor([palette[n] for n in names], dtype=torch.float32, device=device)


def render_batch(scenes: list[Scene], num_frames: int, height: int, width: int,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 `[B, T, H, W, 3]`; pixels whose centre is inside the shape take its colour."""
    if num_frames < 2 or height < 8 or width < 8:
        raise ValueError(f"clip {num_frames}x{height}x{width} too small (need T >= 2, H, W >= 8)")
    time = torch.linspace(0.0, 1.0, num_frames, device=device)[None, :, None, None]
    side = float(min(height, width))
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5)[None, None, :, None]
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5)[None, None, None, :]

    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, device=device, dtype=torch.float32)[:, None, None, None]

    steps = [_STEPS[s.attributes.direction] for s in scenes]
    travel = column([s.distance for s in scenes]) * time
    cx = (column([s.start_x for s in scenes]) + column([st[0] for st in steps]) * travel) * width
    cy = (column([s.start_y for s in scenes]) + column([st[1] for st in steps]) * travel) * height
    r = column([s.size for s in scenes]) * side
    u, v = (xs - cx) / r, (ys - cy) / r  # the shape's own coordinates, [-1, 1] in its box
    masks = {
        "circle": u * u + v * v <= 1.0,
        "square": (u.abs() <= 1.0) & (v.abs() <= 1.0),
        "diamond": u.abs() + v.abs() <= 1.0,
        # apex at the top, base at the bottom: half-width grows from 0 to 1 down the box
        "triangle": (v <= 1.0) & (u.abs() <= (v + 1.0) / 2.0),
    }
    shape_index = torch.tensor([SHAPES.index(s.attributes.shape) for s in scenes], device=device)
    stacked = torch.stack([masks[name].expand(-1, num_frames, height, width) for name in SHAPES])
    inside = stacked[shape_index, torch.arange(len(scenes), device=device)]
    fg = _palette_tensor([s.attributes.colour for s in scenes], OBJECT_COLOURS, device)
    bg = _palette_tensor([s.attributes.background for s in scenes], BACKGROUND_COLOURS, device)
    video = torch.where(inside[..., None], fg[:, None, None, None], bg[:, None, None, None])
    return video.round().to(torch.uint8)


def render_scene(scene: Scene, num_frames: int, height: int, width: int) -> torch.Tensor:
    """uint8 `[T, H, W, 3]` on the CPU."""
    return render_batch([scene], num_frames, height, width)[0]


def to_model_input(videos_BTHWC: torch.Tensor) -> torch.Tensor:
    """uint8 `[B, T, H, W, 3]` -> float `[B, 3, T, H, W]` in [-1, 1], what the Wan VAE takes."""
    if videos_BTHWC.dtype != torch.uint8 or videos_BTHWC.ndim != 5:
        raise ValueError(f"expected uint8 [B, T, H, W, 3], got {videos_BTHWC.dtype} "
                         f"{list(videos_BTHWC.shape)}")
    return videos_BTHWC.permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)
