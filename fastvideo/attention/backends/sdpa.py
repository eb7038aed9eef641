"""PyTorch's `scaled_dot_product_attention` (it picks cuDNN, flash, efficient or math)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastvideo.attention.backends.abstract import AttentionBackend, AttentionImpl, _Backend
from fastvideo.attention.metadata import AttentionMetadata


class SDPAImpl(AttentionImpl):
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                metadata: AttentionMetadata | None = None) -> torch.Tensor:
        # SDPA wants [B, H, S, D]; transposes are views and the kernels take the strides.
        out = F.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
            is_causal=self.causal, scale=self.softmax_scale)
        return out.transpose(1, 2)


BACKEND = AttentionBackend(
    name=_Backend.TORCH_SDPA,
    impl_cls=SDPAImpl,
    dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16}),
)
