"""Attention layers, backends and the backend selector.

The names below load on first use: `fastvideo.attention.sta_config` and `.selector` are
read where no layer runs (a command validating its options before it starts a warm
worker), and the layers import the compiler (~1 s)."""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "ATTENTION_BACKEND_ENV": "fastvideo.attention.selector",
    "AttentionBackend": "fastvideo.attention.backends.abstract",
    "AttentionImpl": "fastvideo.attention.backends.abstract",
    "DistributedAttention": "fastvideo.attention.layer",
    "LocalAttention": "fastvideo.attention.layer",
    "_Backend": "fastvideo.attention.backends.abstract",
    "get_attn_backend": "fastvideo.attention.selector",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
