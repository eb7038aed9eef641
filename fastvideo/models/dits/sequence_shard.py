"""Helpers of the DiTs for their token sequence: the token grid, and sharding the tokens over
the sequence-parallel group (each rank one contiguous block, padded to a multiple of the sp
size) and gathering them back."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastvideo.distributed import (
    get_sp_world_size,
    sequence_model_parallel_all_gather,
    sequence_model_parallel_shard,
)

Grid = tuple[int, int, int]


def token_grid(shape: torch.Size, patch: tuple[int, int, int]) -> Grid:
    """The token grid (T', H', W') of latents `[B, C, T, H, W]` cut in `patch` patches."""
    if len(shape) != 5:
        raise ValueError(f"hidden_states must be [B, C, T, H, W], got {tuple(shape)}")
    sizes = shape[2:]
    if any(s % p for s, p in zip(sizes, patch)):
        raise ValueError(f"latent size (T, H, W) = {tuple(sizes)} is not a multiple of "
                         f"the patch size {tuple(patch)}")
    return sizes[0] // patch[0], sizes[1] // patch[1], sizes[2] // patch[2]


def shard_tokens(x: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's block of the tokens `x` `[B, S, D]` and of their rotary `freqs` `[S, ...]`
    (both as they are with one rank)."""
    # A copy with the strides of a fresh tensor, as every block's output has: the shard is a
    # view (a batch of 1 keeps the full tensor's batch stride), and a compiled block guards
    # on strides, so block 0 would compile apart from the rest.
    x = with_fresh_strides(sequence_model_parallel_shard(pad_to_sp_multiple(x, 1), dim=1))
    return x, sequence_model_parallel_shard(pad_to_sp_multiple(freqs, 0), dim=0)


def gather_tokens(x: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Every rank's block of `x` `[B, S/sp, D]` back in order, without the padding."""
    return sequence_model_parallel_all_gather(x, dim=1)[:, :num_tokens]


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
