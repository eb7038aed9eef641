"""Faster Wan VAE decoding on CUDA, same computation.

A bulk run decodes item k beside item k+1's denoising, so every second of decode is taken
from the DiT. diffusers' `AutoencoderKLWan` at 480x832x81 in fp32 on an H200 spends 2.79 s
a video: ~1.5 s in cuDNN's channels-last convolutions, 0.24 s converting every activation
to channels-last and back for them, ~0.9 s in separate element-wise kernels (normalize,
scale, SiLU, causal-cache copies). Two changes, each within TF32's rounding of the
reference (`benchmarks/bench_vae_decode.py`, `benchmarks/RESULTS.md`):

* conv weights and the latents in `channels_last_3d`, so activations stay in the layout
  cuDNN computes in (2.61 s);
* with `enable_torch_compile`, each residual block and RMS norm compiled by Inductor,
  which fuses their element-wise work (2.19 s; about a minute of compiling on the first
  decode of an empty compile cache, none after).

On the CPU both are slower or not worth their compile, so the loader applies them on CUDA only.
"""

from __future__ import annotations

import logging

import torch
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


def speed_up_vae(vae: nn.Module, *, channels_last: bool, compile_blocks: bool) -> int:
    """Apply the changes above to `vae` in place; returns how many modules were compiled.
    A VAE class not in `SPED_UP_VAES` is left alone (0)."""
    if type(vae).__name__ not in SPED_UP_VAES:
        return 0
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
