"""The attention backend interface (the enum naming every backend: `names`)."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from fastvideo.attention.backends.names import _Backend

if TYPE_CHECKING:
    from fastvideo.attention.metadata import AttentionMetadata

__all__ = ["AttentionBackend", "AttentionImpl", "_Backend"]


class AttentionImpl(ABC):
    """Computes attention on head-major tensors of one process.

    Inputs are `[B, S, H, D]` (batch, sequence, heads, head size); the output has the
    same layout. Sharding across processes happens outside, in `DistributedAttention`.
    `softmax_scale=None` means `1 / sqrt(head_size)`. `layer_idx` is the layer's index in
    the model, for backends configured per layer (sliding tile windows).
    """

    uses_metadata: ClassVar[bool] = False
    """Whether `forward` reads its `metadata`; the layers fill in the per-call fields
    (head offset, text length) only for backends that do."""

    def __init__(self, num_heads: int, head_size: int, softmax_scale: float | None = None,
                 causal: bool = False, *, layer_idx: int | None = None) -> None:
        self.num_heads = num_heads
        self.head_size = head_size
        self.softmax_scale = softmax_scale
        self.causal = causal
        self.layer_idx = layer_idx

    @abstractmethod
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                metadata: AttentionMetadata | None = None) -> torch.Tensor: ...


@dataclass(frozen=True, kw_only=True)
class AttentionBackend:
    """What a backend can run; the selector checks it before choosing the backend."""

    name: _Backend
    impl_cls: type[AttentionImpl]
    dtypes: frozenset[torch.dtype]
    """Input dtypes the kernels accept."""
    device_types: frozenset[str] | None = None
    """`torch.device.type`s it runs on; None: any."""
    max_head_size: int | None = None
    """Largest head size the kernels accept; None: no limit."""
    required_package: str | None = None
    """Top-level package that must import for the backend to run."""
    supports_sequence_parallel: bool = True
    """Whether `DistributedAttention` may use it on sequence shards exchanged by all-to-all."""
    availability: Callable[[int, torch.dtype, torch.device], str | None] | None = None
    """Further check `(head_size, dtype, device) -> why not, or None`, run after the
    fields above (for backends whose kernels depend on the GPU generation)."""
    preferred: Callable[[int, torch.dtype, torch.device], bool] | None = None
    """`(head_size, dtype, device) -> True` where this backend is known to be faster than
    the layers' defaults: when no backend was asked for, a layer supporting it then takes
    it ahead of its own order."""

    def unsupported_reason(self, head_size: int, dtype: torch.dtype,
                           device: torch.device) -> str | None:
        """Why this backend cannot run these inputs, or None when it can."""
        if self.required_package is not None:
            try:
                importlib.import_module(self.required_package)
            except ImportError as e:
                return f"package {self.required_package!r} cannot be imported ({e})"
        if self.device_types is not None and device.type not in self.device_types:
            return f"device {device.type!r} not in {sorted(self.device_types)}"
        if dtype not in self.dtypes:
            return f"dtype {dtype} not in {sorted(str(d) for d in self.dtypes)}"
        if self.max_head_size is not None and head_size > self.max_head_size:
            return f"head size {head_size} > {self.max_head_size}"
        if self.availability is not None:
            return self.availability(head_size, dtype, device)
        return None
