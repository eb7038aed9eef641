"""FlashAttention 2 through the `flash_attn` package (CUDA, fp16/bf16), which takes `[B, S, H, D]`."""

from __future__ import annotations

import torch

from fastvideo.attention.backends.abstract import AttentionBackend, AttentionImpl, _Backend


class FlashAttentionImpl(AttentionImpl):
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attn_mask is not None:
            raise ValueError("the FLASH_ATTN backend takes no attn_mask; use TORCH_SDPA")
        # Imported here: the selector only picks this backend once the import has worked.
        from flash_attn import flash_attn_func

        return flash_attn_func(query, key, value, softmax_scale=self.softmax_scale,
                               causal=self.causal)


BACKEND = AttentionBackend(
    name=_Backend.FLASH_ATTN,
    impl_cls=FlashAttentionImpl,
    dtypes=frozenset({torch.float16, torch.bfloat16}),
    device_types=frozenset({"cuda"}),
    max_head_size=256,
    required_package="flash_attn",
)
