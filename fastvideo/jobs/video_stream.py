"""An item's mp4 encoded while its frames are decoded.

A warm worker's post lane decodes an item and then writes its video; on the first video of
a fresh worker nothing else runs beside them, so the two add up (3.1 s of decode and 2.8 s
of H.264 on an H200's host for 480x832x81). `StreamedVideo` is a `frame_sink`: each chunk
the VAE decodes is rounded to uint8 on the GPU, copied to pinned host memory behind the
decode's queued work, and fed to one ffmpeg process by a thread of its own, so the encoder
runs while the decoder still computes. At the end the video is used only if its frames are
exactly the item's final frames (those the decode checkpoint holds); otherwise the video is
encoded from them as before. Either way the file is the same bytes (`Mp4Writer`).

`FASTVIDEO_STREAM_VIDEO=0` turns it off.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import tempfile
import threading
from pathlib import Path

import torch

from fastvideo.storage.batch_codec import pinned_copy
from fastvideo.utils.video_io import Mp4Writer, to_uint8

logger = logging.getLogger(__name__)

STREAM_VIDEO_ENV = "FASTVIDEO_STREAM_VIDEO"


def streaming_enabled() -> bool:
    return os.environ.get(STREAM_VIDEO_ENV, "1") != "0"


class StreamedVideo:
    """A frame sink (`fastvideo.pipelines.stages.decoding.frame_sink`) that encodes the
    frames it is given into an mp4, one item's video of batch 1; `finish(frames)` returns
    that mp4 if it holds exactly `frames`, else None; `cleanup()` removes it."""

    def __init__(self, fps: int) -> None:
        self.fps = fps
        self._folder: Path | None = None  # made with the writer
        self._queue: queue.Queue = queue.Queue()
        self._writer: Mp4Writer | None = None
        self._thread: threading.Thread | None = None
        self._sent: list[torch.Tensor] = []
        self._error: BaseException | None = None

    def __call__(self, frames: torch.Tensor) -> None:
        if frames.shape[0] != 1 or self._error is not None:
            self._error = self._error or ValueError(f"a batch of {frames.shape[0]} videos")
            return
        pixels = to_uint8(frames[0])
        done = None
        if pixels.is_cuda:
            pixels = pinned_copy(pixels)
            done = torch.cuda.Event()
            done.record()
        if self._writer is None:
            try:
                self._folder = Path(tempfile.mkdtemp(prefix="fastvideo-video-"))
                self._writer = Mp4Writer(self._folder / "video.mp4", height=pixels.shape[1],
                                         width=pixels.shape[2], fps=self.fps)
            except Exception as exc:  # noqa: BLE001 - the video is then encoded as before
                self._error = exc
                return
            self._thread = threading.Thread(target=self._feed, name="mp4-stream", daemon=True)
            self._thread.start()
        self._sent.append(pixels)
        self._queue.put((done, pixels))

    def _feed(self) -> None:
        while (entry := self._queue.get()) is not None:
            done, pixels = entry
            if self._error is not None:
                continue
            try:
                if done is not None:
                    done.synchronize()
                self._writer.write(pixels)
            except Exception as exc:  # noqa: BLE001 - reported by finish()
                self._error = exc

    def finish(self, frames: torch.Tensor | None) -> Path | None:
        """The finished mp4 if what was streamed is exactly `frames` (`[1, T, H, W, 3]`
        uint8, the item's final frames), else None (nothing streamed, a failure, other
        frames: the caller encodes `frames` itself)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
        writer, self._writer = self._writer, None
        if writer is None:
            return None
        streamed = torch.cat(self._sent) if self._sent else None
        self._sent = []
        same = (self._error is None and frames is not None and streamed is not None
                and frames.shape[0] == 1 and torch.equal(streamed, frames[0]))
        if not same:
            writer.abort()
            if self._error is not None:
                logger.warning("the video streamed during decoding failed (%s: %s); "
                               "encoding it after", type(self._error).__name__, self._error)
            return None
        try:
            return writer.close()
        except RuntimeError as exc:
            logger.warning("the video streamed during decoding failed (%s); encoding it "
                           "after", exc)
            return None

    def cleanup(self) -> None:
        """Stop a stream never finished and remove its files."""
        if self._writer is not None:
            if self._thread is not None:
                self._queue.put(None)
                self._thread.join()
            self._writer.abort()
            self._writer = None
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
