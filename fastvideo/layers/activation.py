"""Activation functions by name, as model configs spell them."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class QuickGELU(nn.Module):
    """`x * sigmoid(1.702 x)`, the GELU approximation OpenAI's CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class NewGELU(nn.Module):
    """The tanh GELU written out op by op, as transformers' `gelu_new` (T5's): in half
    precision each op rounds, so `nn.GELU(approximate="tanh")` (one rounding) differs from it
    by an ulp or two, which T5's 24 layers carry into the text embedding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi)
                                           * (x + 0.044715 * torch.pow(x, 3.0))))


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    # diffusers calls the tanh approximation "gelu-approximate" (FeedForward) and
    # "gelu_tanh" (PixArtAlphaTextProjection).
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "gelu-approximate": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "relu": nn.ReLU,
    # transformers' names (T5's "gelu_new", Llama-family "gelu_pytorch_tanh", CLIP's "quick_gelu").
    "gelu_new": NewGELU,
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "quick_gelu": lambda: QuickGELU(),
}


def get_act_fn(name: str) -> nn.Module:
    """A new activation module for `name`; ValueError listing the known names otherwise."""
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(_ACTIVATIONS)}") from None


def is_gelu_tanh(act: nn.Module) -> bool:
    return isinstance(act, nn.GELU) and act.approximate == "tanh"


def linear_gelu_tanh(x: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """`gelu(linear(x), approximate="tanh")`. On CUDA one cuBLASLt matmul applies the GELU in
    its epilogue (on the fp32 accumulator, before rounding) instead of writing the wide
    hidden activation and reading it back: ~0.4 ms per Wan-1.3B block at 480p on an H100."""
    if x.is_cuda and bias is not None and x.dtype in (torch.float16, torch.bfloat16):
        out = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(),
                                      use_gelu=True)
        return out.view(*x.shape[:-1], weight.shape[0])
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")
