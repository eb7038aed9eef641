"""Attention layers the models call: `LocalAttention` and `DistributedAttention`.

Both take `[B, S, H, D]` query/key/value and return `[B, S, H, D]`. The backend is chosen
(`selector.get_attn_backend`) on the first call for each input dtype and device, since a
model is usually built in fp32 on one device and cast or moved afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fastvideo.attention.backends.abstract import AttentionImpl, _Backend
from fastvideo.attention.selector import get_attn_backend
from fastvideo.distributed.parallel_state import get_sp_world_size


class _AttentionLayer(nn.Module):

    def __init__(self, num_heads: int, head_size: int, softmax_scale: float | None = None,
                 causal: bool = False,
                 supported_attention_backends: Sequence[_Backend] = (_Backend.TORCH_SDPA,)) -> None:
        super().__init__()
        if not supported_attention_backends:
            raise ValueError("supported_attention_backends is empty")
        self.num_heads = num_heads
        self.head_size = head_size
        self.softmax_scale = softmax_scale
        self.causal = causal
        self.supported_attention_backends = tuple(supported_attention_backends)
        self._impls: dict[tuple[torch.dtype, torch.device], AttentionImpl] = {}

    def get_impl(self, query: torch.Tensor) -> AttentionImpl:
        """The backend implementation for `query`'s dtype and device, chosen once per pair."""
        key = (query.dtype, query.device)
        impl = self._impls.get(key)
        if impl is None:
            backend = get_attn_backend(self.head_size, query.dtype, query.device,
                                       self.supported_attention_backends)
            impl = backend.impl_cls(self.num_heads, self.head_size, self.softmax_scale,
                                    self.causal)
            self._impls[key] = impl
        return impl

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_size={self.head_size}, causal={self.causal}, "
                f"backends={[b.name for b in self.supported_attention_backends]}")


class LocalAttention(_AttentionLayer):
    """Attention over the tokens this process holds (e.g. cross-attention to the text)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.get_impl(q).forward(q, k, v)


class DistributedAttention(_AttentionLayer):
    """Attention over a sequence that may be sharded across the sequence-parallel group."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if get_sp_world_size() > 1:
            raise NotImplementedError("sequence parallel attention is added by fastvideo.distributed")
        return self.get_impl(q).forward(q, k, v)
