"""Writing frames to mp4 (H.264 through imageio-ffmpeg's bundled ffmpeg)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch


def write_mp4(frames: torch.Tensor, path: str | Path, fps: int = 16) -> Path:
    """Write `[T, H, W, 3]` float frames in [0, 1] to `path` atomically; returns the path."""
    import imageio.v2 as imageio

    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got {tuple(frames.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (frames.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.mp4")
    # macro_block_size=1 keeps small test sizes (e.g. 36x36) as they are.
    with imageio.get_writer(tmp, fps=fps, codec="libx264", quality=8,
                            macro_block_size=1, ffmpeg_log_level="error") as writer:
        for frame in pixels:
            writer.append_data(np.ascontiguousarray(frame))
    os.replace(tmp, path)
    return path


def slug(text: str, max_len: int) -> str:
    """Lowercase letters and digits of `text`, runs of anything else as one dash."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_len].rstrip("-")


def video_file_name(prompt: str, seed: int, max_len: int = 48) -> str:
    """A readable, filesystem-safe name such as `a-cat-walks_seed42.mp4`."""
    return f"{slug(prompt, max_len) or 'video'}_seed{seed}.mp4"
