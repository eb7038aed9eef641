"""Collectives over the tp and sp groups, as layers and attention call them.

Each is a no-op when its group has one process or when model parallel is not initialised,
so single-process code calls them unconditionally.
"""

from __future__ import annotations

import torch

from fastvideo.distributed.parallel_state import (
    get_sp_group,
    get_sp_rank,
    get_sp_world_size,
    get_tp_group,
    get_tp_world_size,
)
from fastvideo.distributed.utils import divide


def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the tp group (in place when the group has several processes)."""
    if get_tp_world_size() == 1:
        return x
    return get_tp_group().all_reduce(x)


def tensor_model_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate the tp ranks' `x` along `dim`, in rank order."""
    if get_tp_world_size() == 1:
        return x
    return get_tp_group().all_gather(x, dim=dim)


def sequence_model_parallel_all_gather(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Concatenate the sp ranks' `x` along `dim` (by default the sequence dim of `[B, S, ...]`)."""
    if get_sp_world_size() == 1:
        return x
    return get_sp_group().all_gather(x, dim=dim)


def sequence_model_parallel_shard(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """This sp rank's contiguous block of `x` along `dim`; the inverse of the all-gather.

    Lets a model split its token sequence without reading its own rank.
    """
    num_ranks = get_sp_world_size()
    if num_ranks == 1:
        return x
    size = divide(x.shape[dim], num_ranks,
                  f"dim {dim} of shape {tuple(x.shape)} over the sequence parallel size")
    return x.narrow(dim, get_sp_rank() * size, size)
