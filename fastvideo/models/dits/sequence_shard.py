"""Helpers of the DiTs for sharding their token sequence over the sequence-parallel group."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastvideo.distributed import get_sp_world_size


def pad_to_sp_multiple(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Zero-pad `x` along `dim` to a multiple of the sp size (`x` itself when it divides)."""
    padding = -x.shape[dim] % get_sp_world_size()
    if padding == 0:
        return x
    return F.pad(x, (0, 0) * (x.dim() - 1 - dim) + (0, padding))


def with_fresh_strides(x: torch.Tensor) -> torch.Tensor:
    """`x` when its strides are those of a new tensor of its shape, else such a copy."""
    if x.stride() == torch.empty(x.shape, device="meta").stride():
        return x
    return x.clone(memory_format=torch.contiguous_format)
