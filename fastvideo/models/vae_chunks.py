"""Decoding a Wan video chunk by chunk, as the VAE computes it anyway.

diffusers' `AutoencoderKLWan` decodes one latent frame at a time (a causal cache carries
what the next frame's convolutions need) and concatenates the pixels at the end. Yielding
each latent frame's pixels as soon as they are computed lets a consumer start on them (an
mp4 encoder, `fastvideo.jobs.video_stream`) while the rest decodes. The chunks are the
very tensors of `vae.decode`, clamped as it clamps them: their concatenation equals its
output exactly (a test holds this against the installed diffusers).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


def decode_in_chunks(vae: Any, latents: torch.Tensor) -> Iterator[torch.Tensor] | None:
    """`vae.decode(latents)`'s video `[B, C, T, H, W]` in chunks along T (in [-1, 1]), or
    None where `vae` does not decode that way (another VAE class, tiling, patchified
    latents, batch slicing): decode it whole then."""
    if type(vae).__name__ != "AutoencoderKLWan" or not _plain_decode(vae, latents):
        return None
    return _chunks(vae, latents)


def _plain_decode(vae: Any, latents: torch.Tensor) -> bool:
    """Whether `vae.decode` runs its frame loop over the whole latents (what `_chunks`
    repeats): no tiling at this size, no patchified latents, no batch slicing."""
    if not all(hasattr(vae, name) for name in ("clear_cache", "post_quant_conv", "decoder",
                                               "_feat_map", "spatial_compression_ratio")):
        return False
    config = vae.config
    if getattr(config, "patch_size", None) is not None:
        return False
    if getattr(vae, "use_slicing", False) and latents.shape[0] > 1:
        return False
    if getattr(vae, "use_tiling", False):
        ratio = vae.spatial_compression_ratio
        if (latents.shape[-1] > vae.tile_sample_min_width // ratio
                or latents.shape[-2] > vae.tile_sample_min_height // ratio):
            return False
    return True


def _chunks(vae: Any, latents: torch.Tensor) -> Iterator[torch.Tensor]:
    vae.clear_cache()
    try:
        x = vae.post_quant_conv(latents)
        for i in range(latents.shape[2]):
            vae._conv_idx = [0]
            out = vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map,
                              feat_idx=vae._conv_idx, first_chunk=i == 0)
            yield torch.clamp(out, min=-1.0, max=1.0)
    finally:
        vae.clear_cache()
