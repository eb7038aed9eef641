"""Timestep and text-condition embedders shared by the DiTs."""

from __future__ import annotations

import math

import torch
from torch import nn

from fastvideo.layers.activation import get_act_fn
from fastvideo.layers.linear import ReplicatedLinear


def timestep_embedding(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool = False,
                       downscale_freq_shift: float = 1.0, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal fp32 `[N, dim]` embedding of `N` (possibly fractional) timesteps.

    Same as diffusers' `get_timestep_embedding` (scale 1); integer timesteps are converted
    to fp32 first.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be 1-D [N], got shape {tuple(timesteps.shape)}")
    half_dim = dim // 2
    exponent = -math.log(max_period) * torch.arange(half_dim, dtype=torch.float32,
                                                    device=timesteps.device)
    freqs = torch.exp(exponent / (half_dim - downscale_freq_shift))
    angles = timesteps[:, None].float() * freqs[None, :]
    sin, cos = torch.sin(angles), torch.cos(angles)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    if dim % 2:
        emb = nn.functional.pad(emb, (0, 1))
    return emb


class MLPEmbedder(nn.Module):
    """`linear_2(act(linear_1(x)))`: diffusers' `TimestepEmbedding` (silu) and
    `PixArtAlphaTextProjection` (gelu_tanh) both have this shape and these parameter names."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int | None = None,
                 act: str = "silu") -> None:
        super().__init__()
        self.linear_1 = ReplicatedLinear(in_dim, hidden_dim)
        self.act = get_act_fn(act)
        self.linear_2 = ReplicatedLinear(hidden_dim, out_dim or hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))
