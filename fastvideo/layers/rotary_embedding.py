"""Rotary position embeddings (RoPE) over a 3D (frames, height, width) token grid.

A head vector is read as `dim / 2` pairs `(x[2j], x[2j+1])`, each rotated by the angle
`pos * theta^(-2j/dim)`: the "interleaved" layout of diffusers' `get_1d_rotary_pos_embed(
use_real=True, repeat_interleave_real=True)`, which Wan uses. The table holds `(cos, sin)`
in fp32 rather than complex numbers, so `torch.compile` fuses the rotation into
neighbouring kernels (Inductor generates no code for complex ops).
"""

from __future__ import annotations

import torch
from torch import nn


def rotary_freqs_1d(dim: int, length: int, theta: float, device: torch.device) -> torch.Tensor:
    """Float32 `[length, dim / 2, 2]` `(cos, sin)` for positions `0 .. length - 1`."""
    if dim % 2:
        raise ValueError(f"rotary dim must be even, got {dim}")
    # Angles in fp64 (as diffusers), rounded once to fp32 at the end; MPS has no fp64.
    dtype = torch.float32 if device.type == "mps" else torch.float64
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=dtype, device=device) / dim)
    angles = torch.outer(torch.arange(length, dtype=dtype, device=device), inv_freq)
    return torch.stack((angles.cos(), angles.sin()), dim=-1).to(torch.float32)


class RotaryEmbedding3D(nn.Module):
    """`(cos, sin)` tables for every token of a `(T, H, W)` grid, flattened frame-major.

    The head dimension is split into `axes_dims = (t_dim, h_dim, w_dim)`; each part rotates
    by its own axis position. No buffers: the table is rebuilt per call (a few small kernels)
    so casting the model to bf16 can never round it.
    """

    def __init__(self, axes_dims: tuple[int, int, int], max_seq_len: int,
                 theta: float = 10000.0) -> None:
        super().__init__()
        self.axes_dims = axes_dims
        self.max_seq_len = max_seq_len
        self.theta = theta

    def forward(self, grid_size: tuple[int, int, int], device: torch.device) -> torch.Tensor:
        """Float32 `[T * H * W, sum(axes_dims) / 2, 2]`."""
        if max(grid_size) > self.max_seq_len:
            raise ValueError(
                f"token grid {grid_size} exceeds rope_max_seq_len={self.max_seq_len}")
        num_t, num_h, num_w = grid_size
        freqs_t, freqs_h, freqs_w = (
            rotary_freqs_1d(dim, length, self.theta, device)
            for dim, length in zip(self.axes_dims, grid_size))
        freqs = torch.cat([
            freqs_t[:, None, None].expand(num_t, num_h, num_w, -1, 2),
            freqs_h[None, :, None].expand(num_t, num_h, num_w, -1, 2),
            freqs_w[None, None, :].expand(num_t, num_h, num_w, -1, 2),
        ], dim=-2)
        return freqs.reshape(num_t * num_h * num_w, -1, 2)

    def extra_repr(self) -> str:
        return f"axes_dims={self.axes_dims}, max_seq_len={self.max_seq_len}, theta={self.theta}"


def apply_rotary_emb(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[B, S, H, D]` by `freqs` `[S, D / 2, 2]`; fp32 math, result in `x.dtype`."""
    # Pair j (x[2j], x[2j+1]) becomes (x[2j] cos - x[2j+1] sin, x[2j+1] cos + x[2j] sin):
    # x * (cos, cos) + swap(x) * (-sin, sin), the same fp32 operations as the complex product.
    # Written so the last op is element-wise on `x`'s own shape, with the pair swap a view of
    # the input and the expanded tables views of the small `freqs`: Inductor then fuses it
    # all into the q/k norm kernel. A result built as `[..., D / 2, 2]` and flattened (or a
    # stack of the two parts) made it write q or k to memory in fp32 and cast it in a
    # second kernel (benchmarks/RESULTS.md).
    x32 = x.float()
    cos, sin = freqs.unsqueeze(1).unbind(-1)  # [S, 1, D / 2] each
    cos = cos.unsqueeze(-1).expand(*cos.shape, 2).flatten(-2)
    signed_sin = torch.stack((-sin, sin), dim=-1).flatten(-2)
    swapped = x32.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return (x32 * cos + swapped * signed_sin).type_as(x)
