"""The per-forward facts sliding tile attention needs beyond q/k/v, passed down the call
stack in a context variable: the denoising loop sets the config and step, the DiT the
token grid. Kept apart from the backend so models import it without FlexAttention."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, replace

from fastvideo.attention.sta_config import STAConfig

Grid = tuple[int, int, int]


@dataclass(frozen=True, kw_only=True)
class STAContext:
    """What STA needs to know about the current forward beyond q/k/v."""

    config: STAConfig | None = None
    grid: Grid | None = None
    """Latent token grid (T, H, W) after patchify, as the DiT flattens it."""
    step: int = 0
    """Denoising step index (windows may change with it)."""
    num_text_tokens: int = 0
    """Text tokens appended after the video tokens in the self-attention sequence."""


_CONTEXT: ContextVar[STAContext | None] = ContextVar("sta_context", default=None)


def current_sta_context() -> STAContext:
    return _CONTEXT.get() or STAContext()


@contextlib.contextmanager
def sta_context(**fields) -> Iterator[STAContext]:
    """Overlay `fields` (of `STAContext`) on the current context for the `with` body: the
    denoising loop sets `config` and `step`, the DiT's forward the `grid`."""
    context = replace(current_sta_context(), **fields)
    token = _CONTEXT.set(context)
    try:
        yield context
    finally:
        _CONTEXT.reset(token)
