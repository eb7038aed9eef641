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
* lean element-wise work (`fastvideo/models/vae_lean_ops.py`): the same math in fewer
  memory passes, no compiler, so safe beside a compiled DiT on another thread. The engine
  does this on every device.
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

import torch
from torch import nn

from fastvideo.models.vae_lean_ops import use_lean_ops

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
