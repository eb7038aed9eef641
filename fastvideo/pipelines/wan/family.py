"""What Wan2.1 pipelines share beyond their stages: the request defaults of the 480p
preset, the frame rate, the prompt cleaning of the reference code, and the VAE's latent
normalisation (per channel, from the VAE's config). Generic stages take these injected."""

from __future__ import annotations

import html
import re
from typing import Any

from fastvideo.fastvideo_args import SamplingParam
from fastvideo.pipelines.stages.latent_normalization import LatentNormalization

SAMPLING = SamplingParam(height=480, width=832, num_frames=81, num_inference_steps=50,
                         guidance_scale=5.0, max_sequence_length=512)
FPS = 16


def clean_prompt(text: str) -> str:
    """The prompt normalisation the Wan reference applies (HTML entities, whitespace)."""
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def latent_normalization(vae_config: Any) -> LatentNormalization:
    """The Wan VAE's per-channel mean and standard deviation (`latents_mean/std`)."""
    return LatentNormalization.per_channel(vae_config.latents_mean, vae_config.latents_std)
