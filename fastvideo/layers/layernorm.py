"""Normalisation layers: RMSNorm, a LayerNorm computed in fp32, and adaLN modulation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension (as `torch.nn.RMSNorm`).

    Wan's "rms_norm_across_heads" q/k norm is this over the flattened heads (`hidden_size =
    num_heads * head_size`), applied before the tensor is split into heads.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, elementwise_affine: bool = True,
                 params_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(hidden_size, dtype=params_dtype))
        else:
            self.register_parameter("weight", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm accumulates in fp32 for half inputs and returns the input dtype.
        return F.rms_norm(x, (self.hidden_size,), self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, affine={self.weight is not None}"


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input and parameter dtypes; returns the input dtype.

    Same math as diffusers' `FP32LayerNorm`: callers that want an fp32 result pass `x.float()`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class LayerNormScaleShift(nn.Module):
    """adaLN: `LayerNorm(x) * (1 + scale) + shift`, all in fp32, cast back to `x.dtype`.

    Diffusers' DiTs do this in fp32 with four elementwise passes; `addcmul` does the
    multiply-add in one pass with the same fp32 math.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = FP32LayerNorm(hidden_size, eps, elementwise_affine=False)

    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        normed = self.norm(x.float())
        return torch.addcmul(shift, normed, 1 + scale).to(x.dtype)


class T5RMSNorm(nn.Module):
    """transformers' `T5LayerNorm`, rounding included: normalise in fp32, round to the weight's
    dtype when that is half precision, then scale. With input and weight of one dtype this is
    also `LlamaRMSNorm`. It differs from `RMSNorm` when T5 keeps `wo` in fp32 in an fp16 model:
    the residual stream is then fp32 and the norm must hand fp16 to the next projection.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6,
                 params_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=params_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            normed = normed.to(self.weight.dtype)
        return self.weight * normed

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"
