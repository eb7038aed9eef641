"""The step times of a process's first denoise, logged once: what a fresh worker's first
item pays above a steady step (Dynamo's tracing, compiled-code loads, kernels' first calls),
the part of the first video's latency that is neither loading nor computing.

Steps are timed on the host, when the loop reports each one: the GPU runs a step behind at
most (the launch queue fills up), so from the second step on these are the GPU's times.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


class FirstDenoiseClock:
    """Times the denoise of the first item `start` is called with; `step` for every step of
    any item (others are ignored); logs the times once that denoise ends."""

    def __init__(self, log: Callable[..., None] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self._log = log or logger.info
        self._clock = clock
        self._lock = threading.Lock()
        self._item: str | None = None
        self._marks: list[float] = []
        self.steps_s: list[float] | None = None
        """The first denoise's step times, once it has ended."""

    def start(self, item_id: str) -> None:
        with self._lock:
            if self._item is None:
                self._item = item_id
                self._marks = [self._clock()]

    def done(self, item_id: str) -> None:
        """`item_id`'s denoise returned: if it never reached its last step (found made, or
        failed), the next item's denoise is timed instead."""
        with self._lock:
            if item_id == self._item and self.steps_s is None:
                self._item = None
                self._marks = []

    def step(self, item_id: str, step: int, total: int) -> None:
        with self._lock:
            if item_id != self._item or self.steps_s is not None:
                return
            self._marks.append(self._clock())
            if step < total:
                return
            times = [b - a for a, b in zip(self._marks, self._marks[1:])]
            self.steps_s = times
        later = times[3:10]
        steady = ""
        if len(later) == 1:
            steady = f"; step 4 {later[0]:.3f} s"
        elif later:
            steady = f"; steps 4-{3 + len(later)} median {statistics.median(later):.3f} s"
        self._log("first denoise of this process: %d steps in %.2f s; steps 1-3 %s s%s",
                  len(times), sum(times), ", ".join(f"{t:.2f}" for t in times[:3]), steady)
