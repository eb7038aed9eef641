"""Prompt adherence for the shapes videos: a plain detector, no learned weights.

From a clip it estimates the background (the per-channel median of all pixels, since the
shape covers a small part of the frame), the shape's pixels (far from the background),
their colour (median, nearest palette entry), the shape (how it fills its bounding box,
and top half against bottom half), and the motion (the centroid's track). `score` compares
that with a prompt, `accuracy` averages over many clips.

Clips are `[T, H, W, 3]`: uint8 in [0, 255], or float in the range named by
`value_range` (`(0, 1)`, what `VideoGenerator` returns, or `(-1, 1)`, the VAE's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastvideo.training.shapes_data import (
    BACKGROUND_COLOURS,
    OBJECT_COLOURS,
    Attributes,
    Scene,
    parse_caption,
)

ATTRIBUTES = ("colour", "shape", "direction", "background")
_FOREGROUND_DISTANCE = 0.25
"""RGB distance (in [0, 1] units) from the background above which a pixel is the shape's;
the closest object/background pair (white on grey) is ~0.6 apart."""
_MIN_PIXELS = 4
"""Fewer shape pixels than this in a frame: the frame tells nothing."""


@dataclass(frozen=True)
class Detection:
    """What the detector read from a clip; None where it could not tell."""

    colour: str | None
    shape: str | None
    direction: str | None
    background: str


def to_unit_range(clip: torch.Tensor,
                  value_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """`[T, H, W, 3]` float32 in [0, 1]."""
    if clip.ndim != 4 or clip.shape[-1] != 3:
        raise ValueError(f"expected a clip [T, H, W, 3], got shape {list(clip.shape)}")
    if clip.dtype == torch.uint8:
        return clip.float() / 255.0
    if value_range not in ((0.0, 1.0), (-1.0, 1.0)):
        raise ValueError(f"value_range {value_range} must be (0, 1) or (-1, 1)")
    low, high = value_range
    clip = clip.float()
    # Generated clips overshoot a little; a clip far outside says the range is wrong.
    if clip.min() < low - 0.1 or clip.max() > high + 0.1:
        raise ValueError(f"clip values [{clip.min():.2f}, {clip.max():.2f}] are not in "
                         f"value_range {value_range}")
    return ((clip - low) / (high - low)).clamp(0.0, 1.0)


def _nearest(rgb: torch.Tensor, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    colours = torch.tensor([palette[n] for n in names], dtype=torch.float32) / 255.0
    return names[int((colours - rgb).norm(dim=1).argmin())]


def _foreground(clip: torch.Tensor, background: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool `[T, H, W]` masks: the shape, and its core (for its colour).

    Blur mixes the shape's edge with the background, so the shape is cut at half its peak
    distance from the background (where the sharp edge was) and its colour read where it is
    near the peak. Pixels with fewer than two shape neighbours are dropped as noise.
    """
    distance = (clip - background).norm(dim=-1)
    mask = distance > _FOREGROUND_DISTANCE
    if not mask.any():
        return mask, mask
    peak = distance[mask].quantile(0.95)
    mask = distance > max(_FOREGROUND_DISTANCE, 0.5 * peak.item())
    window_sum = F.avg_pool2d(mask[:, None].float(), 3, stride=1, padding=1)[:, 0] * 9.0
    neighbours = window_sum - mask.float()
    mask = mask & (neighbours >= 1.5)
    return mask, mask & (distance > 0.8 * peak)


def _shape_features(frame: torch.Tensor) -> tuple[float, float, float] | None:
    """(fill, outside, drop) of one frame's mask, in its bounding box's own coordinates
    u, v in [-1, 1]: the fraction of the box filled; the fraction of the shape outside the
    inscribed diamond |u| + |v| <= 1; and the mean v of the shape (how far down its weight
    sits)."""
    ys, xs = torch.nonzero(frame, as_tuple=True)
    if len(ys) < _MIN_PIXELS:
        return None
    y0, y1, x0, x1 = ys.min().item(), ys.max().item() + 1, xs.min().item(), xs.max().item() + 1
    v = (ys + 0.5 - (y0 + y1) / 2) / ((y1 - y0) / 2)
    u = (xs + 0.5 - (x0 + x1) / 2) / ((x1 - x0) / 2)
    fill = len(ys) / ((y1 - y0) * (x1 - x0))
    return fill, (u.abs() + v.abs() > 1.0).float().mean().item(), v.mean().item()


def _shape(mask: torch.Tensor) -> str | None:
    """From the median features over frames. An apex-up triangle's weight sits a third of
    the way down its box (drop ~0.33, the others ~0); among the rest, fill + outside grows
    from diamond (~0.55 sharp, ~0.85 blurred) to circle (~1.1) to square (~1.5)."""
    features = [f for f in (_shape_features(frame) for frame in mask) if f is not None]
    if not features:
        return None
    fill, outside, drop = torch.tensor(features).median(dim=0).values.tolist()
    if drop > 0.15:
        return "triangle"
    roundness = fill + outside
    return "diamond" if roundness < 0.95 else "circle" if roundness < 1.27 else "square"


def _direction(mask: torch.Tensor) -> str | None:
    """From a least-squares line through the centroids of the frames that show the shape."""
    points = []
    for t, frame in enumerate(mask):
        ys, xs = torch.nonzero(frame, as_tuple=True)
        if len(ys) >= _MIN_PIXELS:
            points.append((t, xs.float().mean().item(), ys.float().mean().item()))
    if len(points) < 2:
        return None
    track = torch.tensor(points)
    t = track[:, 0] - track[:, 0].mean()
    slope_x, slope_y = ((track[:, 1:] - track[:, 1:].mean(0)) * t[:, None]).sum(0) / (t * t).sum()
    if slope_x.abs() >= slope_y.abs():
        return "right" if slope_x > 0 else "left"
    return "down" if slope_y > 0 else "up"


def detect(clip: torch.Tensor, value_range: tuple[float, float] = (0.0, 1.0)) -> Detection:
    """Read colour, shape, direction and background from one clip."""
    clip = to_unit_range(clip, value_range)
    background = clip.reshape(-1, 3).median(dim=0).values
    mask, core = _foreground(clip, background)
    colour = _nearest(clip[core].median(dim=0).values, OBJECT_COLOURS) if core.any() else None
    return Detection(colour=colour, shape=_shape(mask), direction=_direction(mask),
                     background=_nearest(background, BACKGROUND_COLOURS))


def score(clip: torch.Tensor, target: Scene | Attributes | str,
          value_range: tuple[float, float] = (0.0, 1.0)) -> dict[str, bool]:
    """Per attribute, whether the clip shows what `target` (a scene, attributes or a
    caption) asks for; "all" when every attribute does."""
    if isinstance(target, Scene):
        target = target.attributes
    elif isinstance(target, str):
        target = parse_caption(target)
    return compare(detect(clip, value_range), target)


def compare(found: Detection, wanted: Attributes) -> dict[str, bool]:
    """Per attribute, whether the detection is what was wanted; "all" when every one is."""
    flags = {name: getattr(found, name) == getattr(wanted, name) for name in ATTRIBUTES}
    flags["all"] = all(flags.values())
    return flags


def accuracy(clips: Sequence[torch.Tensor], prompts: Sequence[Scene | Attributes | str],
             value_range: tuple[float, float] = (0.0, 1.0)) -> dict[str, float]:
    """Fraction of clips correct per attribute and on all four, e.g. {"colour": 0.97, ...}."""
    if len(clips) != len(prompts) or not clips:
        raise ValueError(f"need as many clips as prompts, at least one: {len(clips)} clips, "
                         f"{len(prompts)} prompts")
    totals = dict.fromkeys((*ATTRIBUTES, "all"), 0)
    for clip, prompt in zip(clips, prompts):
        for name, ok in score(clip, prompt, value_range).items():
            totals[name] += ok
    return {name: count / len(clips) for name, count in totals.items()}
