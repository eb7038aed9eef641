"""Writing frames to mp4 (H.264 by imageio-ffmpeg's bundled ffmpeg)."""

from __future__ import annotations

import os
import re
import subprocess
import threading
from pathlib import Path

import numpy as np
import torch


def write_mp4(frames: torch.Tensor, path: str | Path, fps: int = 16) -> Path:
    """Write `[T, H, W, 3]` frames, float in [0, 1] or uint8 (already rounded as below), to
    `path` atomically; returns the path.

    H.264 by imageio-ffmpeg's bundled ffmpeg, with the settings of imageio's writer
    (quality 8 = CRF 10, yuv420p), run here rather than through imageio: its writer starts
    ffmpeg with a `preexec_fn`, Python code in the forked child, which can deadlock when
    other threads run (seen: a bulk run's task threads hung on a child that never reached
    exec). `start_new_session` keeps Ctrl-C from reaching ffmpeg the same way, in C.
    """
    import imageio_ffmpeg

    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got {tuple(frames.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if frames.dtype != torch.uint8:  # uint8 as given: no float copy (4x the bytes) and back
        frames = (frames.clamp(0, 1) * 255).round().to(torch.uint8)
    pixels = frames.cpu().numpy()
    height, width = pixels.shape[1:3]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp.mp4")
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-f", "rawvideo", "-vcodec", "rawvideo",
           "-s", f"{width}x{height}", "-pix_fmt", "rgb24", "-r", str(fps), "-i", "-", "-an",
           "-vcodec", "libx264", "-pix_fmt", "yuv420p", "-crf", "10", "-v", "error", str(tmp)]
    done = subprocess.run(cmd, input=np.ascontiguousarray(pixels).tobytes(),
                          capture_output=True, start_new_session=True, check=False)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"ffmpeg could not write {path} ({width}x{height}, "
                           f"{len(pixels)} frames): {done.stderr.decode(errors='replace')[-500:]}")
    os.replace(tmp, path)
    return path


def slug(text: str, max_len: int) -> str:
    """Lowercase letters and digits of `text`, runs of anything else as one dash."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_len].rstrip("-")


def video_file_name(prompt: str, seed: int, max_len: int = 48) -> str:
    """A readable, filesystem-safe name such as `a-cat-walks_seed42.mp4`."""
    return f"{slug(prompt, max_len) or 'video'}_seed{seed}.mp4"


_STREAM_SIZE = re.compile(r"Stream #\S+.*?Video:.*?, (\d{2,5})x(\d{2,5})[\s,\[]")


def read_mp4(path: str | Path) -> torch.Tensor:
    """The frames of a video file as `[T, H, W, 3]` uint8 (RGB), decoded by imageio-ffmpeg's
    bundled ffmpeg (the inverse of `write_mp4`, up to H.264's loss)."""
    import imageio_ffmpeg

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video {path} does not exist")
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path),
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    done = subprocess.run(cmd, capture_output=True, start_new_session=True, check=False)
    log = done.stderr.decode(errors="replace")
    size = _STREAM_SIZE.search(log)
    if done.returncode != 0 or size is None:
        raise RuntimeError(f"ffmpeg could not read {path}: {log[-500:]}")
    width, height = int(size[1]), int(size[2])
    pixels = np.frombuffer(done.stdout, dtype=np.uint8)
    if pixels.size == 0 or pixels.size % (height * width * 3):
        raise RuntimeError(f"{path}: {pixels.size} bytes of pixels is not a whole number of "
                           f"{width}x{height} RGB frames")
    return torch.from_numpy(pixels.copy()).reshape(-1, height, width, 3)
