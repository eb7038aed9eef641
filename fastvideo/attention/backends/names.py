"""The attention backends' names, alone: options are checked against them (a command's
first act) before torch and the backends are imported."""

from __future__ import annotations

import enum


class _Backend(enum.Enum):
    TORCH_SDPA = enum.auto()
    FLASH_ATTN = enum.auto()
    SLIDING_TILE_ATTN = enum.auto()


def backend_from_name(name: str | _Backend) -> _Backend:
    """The enum member for `name` (case-insensitive); ValueError listing the valid names."""
    if isinstance(name, _Backend):
        return name
    try:
        return _Backend[name.strip().upper()]
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}; valid: "
                         f"{[b.name for b in _Backend]}") from None
