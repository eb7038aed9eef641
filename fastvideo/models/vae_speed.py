"""Faster Wan VAE decoding on CUDA, same computation.

A bulk run decodes item k beside item k+1's denoising, so every second of decode is taken
from the DiT. diffusers' `AutoencoderKLWan` at 480x832x81 in fp32 on an H200 spends 2.79 s
a video: ~1.5 s in cuDNN's channels-last convolutions, 0.24 s converting every activation
to channels-last and back for them, ~0.9 s in separate element-wise kernels (normalize,
scale, SiLU, causal-cache copies). Two changes, each within TF32's rounding of the
reference (max abs 2.8e-3 on [-1, 1], a third of an 8-bit level; H200 figures from
`benchmarks/bench_vae_decode.py`, in `benchmarks/RESULTS.md`):

* conv weights and the latents in `channels_last_3d`, so activations stay in the layout
  cuDNN computes in: 2.60 s. The engine does this on CUDA (on the CPU it is slower).
* lean element-wise work, the same math in fewer memory passes, no compiler (so safe
  beside a compiled DiT on another thread): each RMS norm as one fused `torch.rms_norm`
  over the channels (innermost in channels-last) instead of normalize, divide, scale,
  gamma and a zero bias (9 passes over the activation -> 2), and each causal conv's
  spatial zero padding done by the convolution itself instead of an `F.pad` copy of its
  input. The engine does this on every device.
* each residual block and RMS norm of the decoder compiled by Inductor as well, which
  fuses their element-wise work: 1.98 s, after ~70 s of compiling on the first decode of
  an empty cache. The engine does **not** do this: a warm worker decodes item k on one
  thread while item k+1's compiled DiT runs on another, and while one thread traces for
  torch.compile (a global FX-tracing flag) any compiled call on the other fails ("Detected
  that you are using FX to symbolically trace a dynamo-optimized function"); an H200 bulk
  run lost 2 of 6 items to it. `compile_blocks=True` is kept for the benchmark.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

SPED_UP_VAES = frozenset({"AutoencoderKLWan"})
"""VAE classes measured with these changes; others are left as their library made them."""

_COMPILED_CLASSES = frozenset({"WanResidualBlock", "WanRMS_norm"})
# Graphs per decode: every block at each level, for the first chunk (no causal cache yet),
# the second and the rest; the default limit of 8 per code object would leave most eager.
_RECOMPILE_LIMIT = 256

CHANNELS_LAST_ATTR = "_fastvideo_channels_last"
"""Set on a VAE whose conv weights are channels-last: its input should be too."""


def speed_up_vae(vae: nn.Module, *, channels_last: bool, compile_blocks: bool,
                 lean_ops: bool = True) -> int:
    """Apply the changes above to `vae` in place; returns how many modules were compiled.
    A VAE class not in `SPED_UP_VAES` is left alone (0). Compile only where nothing else
    runs compiled code at the same time (see above)."""
    if type(vae).__name__ not in SPED_UP_VAES:
        return 0
    if lean_ops:
        use_lean_ops(vae)
    if channels_last:
        for module in vae.modules():
            if isinstance(module, nn.Conv3d):
                module.weight.data = module.weight.data.contiguous(
                    memory_format=torch.channels_last_3d)
        setattr(vae, CHANNELS_LAST_ATTR, True)
    if not compile_blocks:
        return 0
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, _RECOMPILE_LIMIT)
    compiled = 0
    for module in getattr(vae, "decoder", vae).modules():
        if type(module).__name__ in _COMPILED_CLASSES:
            module.forward = torch.compile(module.forward, dynamic=False)
            compiled += 1
    logger.info("compiling %d modules of %s's decoder with torch.compile (first decode is "
                "slow)", compiled, type(vae).__name__)
    return compiled


def vae_input(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """`latents` in the memory layout `vae`'s convolutions want."""
    if getattr(vae, CHANNELS_LAST_ATTR, False) and latents.dim() == 5:
        return latents.contiguous(memory_format=torch.channels_last_3d)
    return latents


LEAN_OPS_ATTR = "_fastvideo_lean_ops"
"""Set on a VAE whose RMS norms and causal convolutions run `use_lean_ops`' forwards."""
# A norm's eps: F.normalize divides by max(||x||, 1e-12); as a mean over C channels that
# floor is 1e-24 / C, so an all-zero row gives 0 as it does there, and any other row the
# same value to rounding.
_NORMALIZE_EPS = 1e-12


def use_lean_ops(vae: nn.Module) -> int:
    """Give the Wan VAE's RMS norms and causal convolutions the lean forwards (module
    docstring); returns how many modules changed. Modules whose attributes are not those
    this was written against (another diffusers version) are left as they are."""
    changed = 0
    for module in vae.modules():
        name = type(module).__name__
        if name == "WanRMS_norm" and _is_plain_rms_norm(module):
            module.forward = types.MethodType(_rms_norm_forward, module)
        elif name == "WanCausalConv3d" and _is_plain_causal_conv(module):
            module.forward = types.MethodType(_causal_conv_forward, module)
        else:
            continue
        changed += 1
    setattr(vae, LEAN_OPS_ATTR, True)
    return changed


def _is_plain_rms_norm(module: nn.Module) -> bool:
    gamma = getattr(module, "gamma", None)
    return (isinstance(gamma, torch.Tensor) and isinstance(getattr(module, "scale", None), float)
            and isinstance(getattr(module, "channel_first", None), bool)
            and (isinstance(getattr(module, "bias", None), torch.Tensor)
                 or getattr(module, "bias", None) == 0.0))


def _is_plain_causal_conv(module: nn.Module) -> bool:
    pads = getattr(module, "_padding", None)
    return (isinstance(module, nn.Conv3d) and isinstance(pads, tuple) and len(pads) == 6
            and pads[0] == pads[1] and pads[2] == pads[3] and pads[5] == 0
            and tuple(module.padding) == (0, 0, 0) and module.padding_mode == "zeros")


def _rms_norm_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """`normalize(x, dim=channels) * scale * gamma + bias` as one fused RMS norm where the
    channels are innermost in memory (channels-last); otherwise diffusers' own forward."""
    dim = 1 if self.channel_first else -1
    if x.stride(dim) != 1 and x.shape[dim] != 1:
        return type(self).forward(self, x)
    channels = x.shape[dim]
    # normalize(x) * sqrt(C) is x / rms(x): the scale (sqrt(C) as diffusers builds it)
    # cancels, leaving gamma as the weight.
    factor = self.scale / channels ** 0.5
    weight = self.gamma.reshape(channels) * factor if factor != 1.0 else self.gamma.reshape(
        channels)
    weight = weight.to(x.dtype)
    out = torch.rms_norm(x.movedim(dim, -1), (channels,), weight,
                         _NORMALIZE_EPS ** 2 / channels).movedim(-1, dim)
    if isinstance(self.bias, torch.Tensor):
        out = out + self.bias
    return out


def _causal_conv_forward(self: Any, x: torch.Tensor,
                         cache_x: torch.Tensor | None = None) -> torch.Tensor:
    """diffusers' causal convolution with the spatial zero padding left to the convolution
    (no padded copy of the input); only the causal frames in front are concatenated or
    padded, as there."""
    w_pad, _, h_pad, _, front, _ = self._padding
    if cache_x is not None and front > 0:
        x = torch.cat([cache_x.to(x.device), x], dim=2)
        front -= cache_x.shape[2]
    if front:
        x = F.pad(x, (0, 0, 0, 0, front, 0))
    return F.conv3d(x, self.weight, self.bias, self.stride, (0, h_pad, w_pad), self.dilation,
                    self.groups)
