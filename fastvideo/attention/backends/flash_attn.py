"""FlashAttention kernels, which take `[B, S, H, D]` directly (CUDA, fp16/bf16).

On Hopper and Blackwell with the `flash-attn-4` package installed, its CuTe kernels
(`flash_cute`): faster than cuDNN's attention there, so layers prefer this backend to
their default when no backend was asked for. Otherwise FlashAttention 2 from the
`flash_attn` package, used only when asked for.
"""

from __future__ import annotations

import torch

from fastvideo.attention.backends.abstract import AttentionBackend, AttentionImpl, _Backend
from fastvideo.attention.backends.flash_cute import cute_unavailable_reason, flash_cute_attention
from fastvideo.attention.metadata import AttentionMetadata


class FlashAttentionImpl(AttentionImpl):
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                metadata: AttentionMetadata | None = None) -> torch.Tensor:
        if cute_unavailable_reason(query.device, query.dtype, query.shape[-1]) is None:
            scale = self.softmax_scale or query.shape[-1] ** -0.5
            return flash_cute_attention(query, key, value, scale, self.causal)
        # Imported here: the selector only picks this backend once one of the imports works.
        from flash_attn import flash_attn_func

        return flash_attn_func(query, key, value, softmax_scale=self.softmax_scale,
                               causal=self.causal)


def _unsupported(head_size: int, dtype: torch.dtype, device: torch.device) -> str | None:
    """None when the CuTe kernels or FlashAttention 2 can run; else why neither can."""
    cute = cute_unavailable_reason(device, dtype, head_size)
    if cute is None:
        return None
    try:
        from flash_attn import flash_attn_func  # noqa: F401
    except ImportError as e:
        return f"package 'flash_attn' cannot be imported ({e}); CuTe kernels: {cute}"
    return None


def _preferred(head_size: int, dtype: torch.dtype, device: torch.device) -> bool:
    return cute_unavailable_reason(device, dtype, head_size) is None


BACKEND = AttentionBackend(
    name=_Backend.FLASH_ATTN,
    impl_cls=FlashAttentionImpl,
    dtypes=frozenset({torch.float16, torch.bfloat16}),
    device_types=frozenset({"cuda"}),
    max_head_size=256,
    availability=_unsupported,
    preferred=_preferred,
)
