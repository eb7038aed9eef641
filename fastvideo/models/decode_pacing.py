"""Pacing a VAE decode that runs beside denoising, so it never stalls the DiT's launches.

A warm worker decodes item k on its post lane (a thread, on a CUDA stream of low priority)
while item k+1 denoises on its GPU lane (another thread, a high-priority stream). The
decode's kernels wait behind the DiT's, so its thread, free to run ahead, fills its
stream's queue of launches. Once the queue is full, a launch blocks in the CUDA driver,
and PyTorch launches holding Python's GIL: the DiT's thread, which needs the GIL to launch
its own kernels, would then wait too, its queue would drain and the GPU idle until a decode
kernel ends. That is the likely reason (not yet measured apart) why, on an H200, a decode
of 2.6 s alone costs the DiT beside it ~2 s and takes as long as a whole denoise
(benchmarks/RESULTS.md, "Bulk generation on one GPU").

`pace_decoder` keeps at most `max_in_flight` (`InFlightLimit`) calls of a VAE's decoder (one call per
latent frame chunk for Wan, a few hundred kernels) queued on the GPU when the next call
starts launching: after each call its thread waits, outside the GIL, for the calls before
the last `max_in_flight` to end. The results are the same; only when the thread launches
changes. Nothing happens for tensors off CUDA.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

PACED_ATTR = "_fastvideo_decode_pacing"
PACING_ENV = "FASTVIDEO_DECODE_PACING"
"""1 (default): the engine paces the VAEs it loads onto CUDA; 0: it does not (to compare)."""
DEFAULT_MAX_IN_FLIGHT = 1
"""One chunk queued while the next launches: ~2 chunks' kernels at most, far from filling a
stream's queue, and the GPU still has the decode's next work when a chunk ends."""


class _Event(Protocol):
    def record(self) -> None: ...
    def synchronize(self) -> None: ...


class InFlightLimit:
    """Per thread: record an event after each call, then wait for the one `max_in_flight`
    calls back (the GPU keeps the newer ones queued, so it never runs dry)."""

    def __init__(self, max_in_flight: int,
                 make_event: Callable[[], _Event] = lambda: torch.cuda.Event(blocking=True)
                 ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.max_in_flight = max_in_flight
        self.make_event = make_event
        self._local = threading.local()

    def after_call(self) -> None:
        pending: deque[_Event] = self._local.__dict__.setdefault("pending", deque())
        event = self.make_event()
        event.record()  # on the calling thread's current stream
        pending.append(event)
        while len(pending) > self.max_in_flight:
            pending.popleft().synchronize()  # releases the GIL while it waits


def pacing_enabled() -> bool:
    """`PACING_ENV`, checked."""
    value = os.environ.get(PACING_ENV, "1").strip() or "1"
    if value not in ("0", "1"):
        raise ValueError(f"{PACING_ENV}={value!r}; allowed: 1 (pace decodes), 0 (do not)")
    return value == "1"


def pace_decoder(vae: nn.Module, limit: InFlightLimit | None = None, *,
                 device_type: str = "cuda") -> bool:
    """Install the pacing on `vae.decoder` (once; `limit` defaults to
    `DEFAULT_MAX_IN_FLIGHT` on CUDA events) for outputs on `device_type`; False if `vae`
    has no decoder module."""
    decoder = getattr(vae, "decoder", None)
    if not isinstance(decoder, nn.Module):
        return False
    if getattr(vae, PACED_ATTR, None) is None:
        paced = limit or InFlightLimit(DEFAULT_MAX_IN_FLIGHT)

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            first = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(first, torch.Tensor) and first.device.type == device_type:
                paced.after_call()

        decoder.register_forward_hook(hook)
        setattr(vae, PACED_ATTR, paced)
    return True
