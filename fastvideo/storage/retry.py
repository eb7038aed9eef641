"""`retry_io`: retry a store call on transient failures only."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from fastvideo.storage.errors import StoreUnavailableError

T = TypeVar("T")
logger = logging.getLogger(__name__)


def retry_io(fn: Callable[[], T], attempts: int = 3, backoff: float = 0.5) -> T:
    """Call `fn`, retrying on `StoreUnavailableError` with exponential backoff.

    Other errors (bad credentials, corrupt data) propagate at once: retrying
    cannot fix them. After `attempts` failures the last error propagates.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except StoreUnavailableError as exc:
            if attempt == attempts:
                raise
            delay = backoff * 2 ** (attempt - 1)
            logger.warning(
                "store unavailable (%s); retry %d/%d in %.2fs", exc, attempt, attempts - 1, delay
            )
            time.sleep(delay)
    raise AssertionError("unreachable")
