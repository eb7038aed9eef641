"""The two-layer MLP of the DiT blocks."""

from __future__ import annotations

import torch
from torch import nn

from fastvideo.layers.activation import get_act_fn, is_gelu_tanh, linear_gelu_tanh
from fastvideo.layers.linear import ReplicatedLinear


class FeedForward(nn.Module):
    """`fc_out(act(fc_in(x)))`; diffusers' `FeedForward` names these `net.0.proj` and `net.2`."""

    def __init__(self, dim: int, hidden_dim: int, out_dim: int, act: str) -> None:
        super().__init__()
        self.fc_in = ReplicatedLinear(dim, hidden_dim)
        self.act = get_act_fn(act)
        self.fc_out = ReplicatedLinear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_gelu_tanh(self.act):
            return self.fc_out(linear_gelu_tanh(x, self.fc_in.weight, self.fc_in.bias))
        return self.fc_out(self.act(self.fc_in(x)))
