"""mp4 writing: the same bytes as imageio's writer, safe from many threads, clear errors."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from fastvideo.utils.video_io import Mp4Writer, write_mp4


def _frames(seed: int, shape=(5, 32, 48, 3)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def test_same_bytes_as_imageios_writer(tmp_path: Path) -> None:
    import imageio.v2 as imageio

    frames = _frames(0)
    ours = write_mp4(frames, tmp_path / "ours.mp4", fps=16).read_bytes()
    pixels = (frames.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    with imageio.get_writer(tmp_path / "imageio.mp4", fps=16, codec="libx264", quality=8,
                            macro_block_size=1, ffmpeg_log_level="error") as writer:
        for frame in pixels:
            writer.append_data(np.ascontiguousarray(frame))
    assert ours == (tmp_path / "imageio.mp4").read_bytes()  # earlier runs' digests still hold
    # Frames already rounded to uint8 (what a decode checkpoint keeps) make the same file.
    as_stored = write_mp4(torch.from_numpy(pixels), tmp_path / "uint8.mp4", fps=16)
    assert as_stored.read_bytes() == ours


def test_many_threads_write_at_once(tmp_path: Path) -> None:
    # The bulk flow's task threads and a warm worker's post lane write side by side.
    def write(i: int) -> str:
        path = write_mp4(_frames(i % 4, (2, 16, 16, 3)), tmp_path / f"{i}.mp4")
        return hashlib.sha256(path.read_bytes()).hexdigest()

    with ThreadPoolExecutor(8) as pool:
        digests = list(pool.map(write, range(48), timeout=120))
    assert len(set(digests)) == 4 and len(list(tmp_path.glob("*.mp4"))) == 48
    assert not list(tmp_path.glob(".*tmp.mp4"))


def test_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"frames must be \[T, H, W, 3\]"):
        write_mp4(torch.zeros(2, 16, 16), tmp_path / "a.mp4")
    with pytest.raises(RuntimeError, match=r"ffmpeg could not write .*odd.mp4 \(15x15, 2 frames\)"):
        write_mp4(_frames(0, (2, 15, 15, 3)), tmp_path / "odd.mp4")
    assert not list(tmp_path.iterdir())


def test_writer_fed_in_chunks_writes_the_same_bytes(tmp_path: Path) -> None:
    """A video encoded while its frames arrive is the file `write_mp4` makes of them all."""
    frames = _frames(3, (6, 32, 48, 3))
    whole = write_mp4(frames, tmp_path / "whole.mp4").read_bytes()
    writer = Mp4Writer(tmp_path / "chunks.mp4", height=32, width=48)
    for part in (frames[:1], frames[1:5], frames[5:]):
        writer.write(part)
    assert writer.close().read_bytes() == whole
    assert not list(tmp_path.glob(".*tmp.mp4"))


def test_writer_errors_and_abort_leave_nothing(tmp_path: Path) -> None:
    writer = Mp4Writer(tmp_path / "a.mp4", height=32, width=48)
    with pytest.raises(ValueError, match=r"frames must be \[T, 32, 48, 3\], got \(2, 16, 48, 3\)"):
        writer.write(_frames(0, (2, 16, 48, 3)))
    writer.write(_frames(0, (2, 32, 48, 3)))
    writer.abort()
    with pytest.raises(ValueError, match=r"no frames were written to .*b.mp4"):
        Mp4Writer(tmp_path / "b.mp4", height=32, width=48).close()
    assert not list(tmp_path.iterdir())
