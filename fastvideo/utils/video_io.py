"""Writing frames to mp4 (H.264 by imageio-ffmpeg's bundled ffmpeg)."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch


def write_mp4(frames: torch.Tensor, path: str | Path, fps: int = 16) -> Path:
    """Write `[T, H, W, 3]` frames, float in [0, 1] or uint8 (already rounded as below), to
    `path` atomically; returns the path. The bytes are those of `Mp4Writer` fed the same
    frames in any chunks."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got {tuple(frames.shape)}")
    writer = Mp4Writer(path, height=frames.shape[1], width=frames.shape[2], fps=fps)
    try:
        writer.write(frames)
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """Frames in [0, 1] as uint8, rounded to the nearest level (the same on any device:
    one IEEE product and round-half-even); uint8 frames as given."""
    if frames.dtype == torch.uint8:
        return frames
    return (frames.float().clamp(0, 1) * 255).round().to(torch.uint8)


class Mp4Writer:
    """An mp4 written as its `[t, H, W, 3]` frames arrive, by one ffmpeg process started
    at once: a video can be encoded while it is still being decoded. `close()` moves the
    finished file to `path` (atomically) and returns it; `abort()` leaves nothing.

    H.264 by imageio-ffmpeg's bundled ffmpeg, with the settings of imageio's writer
    (quality 8 = CRF 10, yuv420p), started here rather than through imageio: its writer
    starts ffmpeg with a `preexec_fn`, Python code in the forked child, which can deadlock
    when other threads run (seen: a bulk run's task threads hung on a child that never
    reached exec). `start_new_session` keeps Ctrl-C from reaching ffmpeg the same way, in C.
    """

    def __init__(self, path: str | Path, *, height: int, width: int, fps: int = 16) -> None:
        import imageio_ffmpeg

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.height, self.width, self.frames = height, width, 0
        self._tmp = self.path.with_name(
            f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp.mp4")
        # ffmpeg's messages to a file: a pipe nobody reads could fill and stall it.
        self._log = tempfile.TemporaryFile()
        cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-f", "rawvideo", "-vcodec", "rawvideo",
               "-s", f"{width}x{height}", "-pix_fmt", "rgb24", "-r", str(fps), "-i", "-",
               "-an", "-vcodec", "libx264", "-pix_fmt", "yuv420p", "-crf", "10", "-v", "error",
               str(self._tmp)]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                      stderr=self._log, start_new_session=True)

    def write(self, frames: torch.Tensor) -> None:
        """Append `[t, H, W, 3]` frames (float in [0, 1] or uint8; see `to_uint8`)."""
        if frames.ndim != 4 or tuple(frames.shape[1:]) != (self.height, self.width, 3):
            raise ValueError(f"frames must be [T, {self.height}, {self.width}, 3], got "
                             f"{tuple(frames.shape)}")
        pixels = np.ascontiguousarray(to_uint8(frames).cpu().numpy())
        try:
            self._proc.stdin.write(pixels.data)
        except BrokenPipeError:
            self._failed()
        self.frames += len(pixels)

    def close(self) -> Path:
        """Finish the video; returns its path. A video of no frames is an error."""
        if self.frames == 0:
            self.abort()
            raise ValueError(f"no frames were written to {self.path}")
        try:
            self._proc.stdin.close()
        except BrokenPipeError:
            pass
        if self._proc.wait() != 0:
            self._failed()
        self._log.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Stop ffmpeg and remove what it wrote."""
        if self._proc.poll() is None:
            self._proc.kill()
        try:
            self._proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        self._proc.wait()
        self._log.close()
        self._tmp.unlink(missing_ok=True)

    def _failed(self) -> NoReturn:
        self._proc.wait()
        self._log.seek(0)
        message = self._log.read().decode(errors="replace")[-500:]
        self.abort()
        raise RuntimeError(f"ffmpeg could not write {self.path} ({self.width}x{self.height}, "
                           f"{self.frames} frames): {message}")


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
