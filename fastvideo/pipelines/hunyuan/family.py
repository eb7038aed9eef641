"""What HunyuanVideo pipelines share beyond their stages: the request defaults of
diffusers' `HunyuanVideoPipeline`, the frame rate, the Llama prompt template, the noise
schedule, the latent geometry and scaling, and how the DiT takes its inputs."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fastvideo.fastvideo_args import SamplingParam
from fastvideo.forward_batch import ForwardBatch
from fastvideo.pipelines.stages import LatentGeometry, PromptTemplate
from fastvideo.pipelines.stages.denoising import DiTContext
from fastvideo.pipelines.stages.latent_normalization import LatentNormalization

# `guidance_scale` is true classifier-free guidance (diffusers' `true_cfg_scale`), off by
# default: the DiT is guidance-distilled and takes `embedded_guidance_scale` as an input.
SAMPLING = SamplingParam(height=720, width=1280, num_frames=129, num_inference_steps=50,
                         guidance_scale=1.0, max_sequence_length=256,
                         embedded_guidance_scale=6.0)
FPS = 24

PROMPT_TEMPLATE = PromptTemplate(template=(
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the "
    "following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the "
    "objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the "
    "objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"))
"""diffusers' `DEFAULT_PROMPT_TEMPLATE`. Its crop is counted with the checkpoint's own
tokenizer (`crop_start=None`): for HunyuanVideo's Llama-3 tokenizer that is the 95 tokens
diffusers pins, and a tokenizer of another vocabulary (the tiny test model's) gets its own
count instead of a crop that cuts into the prompt."""
LLAMA_HIDDEN_LAYERS_TO_SKIP = 2
"""The reference keeps the Llama hidden state two layers before the last."""
CLIP_MAX_LENGTH = 77


def sigmas(num_steps: int) -> list[float]:
    """The reference's noise levels before the scheduler's shift: evenly spaced from 1."""
    return np.linspace(1.0, 0.0, num_steps + 1)[:-1].tolist()


def _config(config: Any, key: str) -> Any:
    value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
    if value is None:
        raise ValueError(f"HunyuanVideo model config has no {key!r}")
    return value


def geometry(vae_config: Any, transformer_config: Any) -> LatentGeometry:
    """`AutoencoderKLHunyuanVideo`'s compression ratios and channels, and the DiT's patch."""
    patch = int(_config(transformer_config, "patch_size"))
    return LatentGeometry(
        spatial_factor=int(_config(vae_config, "spatial_compression_ratio")),
        temporal_factor=int(_config(vae_config, "temporal_compression_ratio")),
        latent_channels=int(_config(vae_config, "latent_channels")),
        patch_size=(int(_config(transformer_config, "patch_size_t")), patch, patch))


def latent_normalization(vae_config: Any) -> LatentNormalization:
    """One scaling factor for every channel (`scaling_factor` in the VAE's config)."""
    return LatentNormalization.scaling_factor(float(_config(vae_config, "scaling_factor")))


def dit_inputs(batch: ForwardBatch, negative: bool, device: str,
               dtype: torch.dtype) -> DiTContext:
    """The HunyuanVideo DiT's context for one guidance branch: the Llama tokens and their
    mask, the pooled CLIP vector, and the embedded guidance x 1000, in the DiT's dtype as
    the reference passes them (the guidance multiplied in that dtype, too)."""
    if batch.embedded_guidance_scale is None:
        raise ValueError("HunyuanVideo needs embedded_guidance_scale (the family default is "
                         f"{SAMPLING.embedded_guidance_scale}); the batch has None")
    prefix = "negative_" if negative else ""
    fields = (f"{prefix}prompt_embeds", f"{prefix}prompt_attention_mask",
              f"{prefix}pooled_prompt_embeds")
    missing = [name for name in fields if getattr(batch, name) is None]
    if missing:
        raise ValueError(f"the HunyuanVideo DiT needs {missing}; run the text encoding first")
    embeds, mask, pooled = (getattr(batch, name).to(device) for name in fields)
    guidance = torch.tensor([batch.embedded_guidance_scale] * embeds.shape[0], dtype=dtype,
                            device=device) * 1000.0
    return {"encoder_hidden_states": embeds.to(dtype), "encoder_attention_mask": mask.to(dtype),
            "pooled_projections": pooled.to(dtype), "guidance": guidance}
