"""What an attention backend needs to know about the current forward beyond q/k/v, passed
down explicitly: the denoising stage → the DiT's forward → its blocks → the attention layer
→ the backend's `forward(q, k, v, metadata)`. Dense backends ignore it; sliding tile
attention reads its windows, grid and text length from it. Kept apart from the backends so
models import it without FlexAttention."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from fastvideo.attention.sta_config import STAConfig

Grid = tuple[int, int, int]


@dataclass(frozen=True, kw_only=True)
class AttentionMetadata:
    """Per-forward facts for the attention backends; each caller fills in what it knows."""

    sta_config: STAConfig | None = None
    """Sliding tile windows (set by the denoising stage); None: no STA configured."""
    step: int = 0
    """Denoising step index (STA windows may change with it)."""
    grid: Grid | None = None
    """Latent token grid (T, H, W) after patchify, as the DiT flattens it (set by the DiT)."""
    num_text_tokens: int = 0
    """Text tokens appended after the video tokens in the self-attention sequence."""
    head_offset: int = 0
    """Global index of the backend's head 0: under sequence parallelism the first head this
    rank holds after the all-to-all (set by `DistributedAttention`)."""


@torch.compiler.disable
def with_fields(metadata: AttentionMetadata, **changes: object) -> AttentionMetadata:
    """`dataclasses.replace`, kept out of compiled graphs: traced, it reads every field and
    Dynamo guards on each, so a compiled block would recompile at every denoising step."""
    return dataclasses.replace(metadata, **changes)
