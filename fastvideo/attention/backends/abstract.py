"""The attention backend interface and the enum naming every backend."""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod

import torch


class _Backend(enum.Enum):
    TORCH_SDPA = enum.auto()
    FLASH_ATTN = enum.auto()
    SLIDING_TILE_ATTN = enum.auto()


class AttentionImpl(ABC):
    """Computes attention on head-major tensors of one process.

    Inputs are `[B, S, H, D]` (batch, sequence, heads, head size); the output has the
    same layout. Sharding across processes happens outside, in `DistributedAttention`.
    """

    @abstractmethod
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor: ...
