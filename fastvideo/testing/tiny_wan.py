"""Writes a complete, tiny Wan2.1 checkpoint (T2V or I2V) in Diffusers format.

Every component is built with its own library's class and saved with its own
`save_pretrained`, so the folder layout is exactly a real checkpoint's; only the sizes
are small and the weights random. The tokenizer is trained here, on a few sentences,
because nothing may be downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_CORPUS = [
    "a cat walks across a sunny garden",
    "a red car drives along the coast at dusk",
    "waves crash on the rocks under a grey sky",
    "a person rides a bicycle through the city at night",
    "snow falls on a quiet forest, slow camera pan",
    "a drone flies over green hills and a river",
    "close up of a flower opening in the morning light",
    "bad quality, blurry, static, distorted, low resolution",
]
KINDS = ("t2v", "i2v")
SCHEDULERS = ("unipc", "euler")


@dataclass(frozen=True)
class TinyWanConfig:
    """Sizes of the tiny model (defaults run a 64x64, 9-frame video in seconds on a CPU)."""

    kind: str = "t2v"
    """"t2v" (WanPipeline) or "i2v" (WanImageToVideoPipeline: a CLIP image encoder, and a
    DiT that takes the first frame's latents and mask as extra input channels)."""
    z_dim: int = 4
    text_dim: int = 32
    num_layers: int = 2
    num_heads: int = 2
    head_dim: int = 16
    vae_base_dim: int = 8
    vocab_size: int = 64
    scheduler: str = "unipc"
    """"unipc" or "euler" (flow-match Euler)."""
    seed: int = 0
    clip_dim: int = 24
    """I2V: CLIP vision width, the DiT's `image_dim` (differs from the DiT's width on purpose,
    so a swapped dimension fails)."""
    clip_image_size: int = 32
    """I2V: CLIP input size; with `clip_patch_size` 8 that is 16 patch tokens + 1 class token."""
    clip_patch_size: int = 8

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown tiny Wan kind {self.kind!r}; use one of {KINDS}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; use one of {SCHEDULERS}")


def _build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import T5TokenizerFast

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    from tokenizers.processors import TemplateProcessing
    eos = tokenizer.token_to_id("</s>")
    tokenizer.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos)])
    return T5TokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                           unk_token="<unk>", extra_ids=0)


def _perturb_(module: torch.nn.Module, generator: torch.Generator, scale: float = 0.05) -> None:
    # Diffusers zero-initialises some layers; random offsets make every weight matter in tests.
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)


def _build_scheduler(name: str) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if name == "unipc":
        return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                       flow_shift=3.0, num_train_timesteps=1000)
    return FlowMatchEulerDiscreteScheduler(shift=3.0, num_train_timesteps=1000)


def _build_image_encoder(config: TinyWanConfig, generator: torch.Generator) -> tuple[Any, Any]:
    """A tiny CLIP vision tower and the processor that resizes and crops to its input size."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=config.clip_dim, intermediate_size=2 * config.clip_dim, num_hidden_layers=2,
        num_attention_heads=2, image_size=config.clip_image_size,
        patch_size=config.clip_patch_size, projection_dim=16)).eval()
    _perturb_(encoder, generator)
    # Explicit arguments: the defaults are CLIP's mean/std, bicubic resize, center crop.
    processor = CLIPImageProcessor(
        size={"shortest_edge": config.clip_image_size},
        crop_size={"height": config.clip_image_size, "width": config.clip_image_size})
    return encoder, processor


def make_tiny_wan(output: str | Path, config: TinyWanConfig | None = None) -> Path:
    """Write the checkpoint to `output` (created if needed) and return its path."""
    from diffusers import (
        AutoencoderKLWan,
        WanImageToVideoPipeline,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    config = config or TinyWanConfig()
    output = Path(output)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    i2v = config.kind == "i2v"
    temporal_factor = 2  # the VAE below downsamples time once

    tokenizer = _build_tokenizer(config.vocab_size)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=config.text_dim, d_kv=8, d_ff=64, num_layers=2,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)).eval()
    # I2V: the noisy latents, then the first-frame mask (one channel per frame a latent frame
    # covers) and the first-frame latents, concatenated on channels: 36 = 16 + 4 + 16 in Wan2.1.
    in_channels = 2 * config.z_dim + temporal_factor if i2v else config.z_dim
    image_options = dict(image_dim=config.clip_dim,
                         added_kv_proj_dim=config.num_heads * config.head_dim) if i2v else {}
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=config.num_heads,
        attention_head_dim=config.head_dim, in_channels=in_channels,
        out_channels=config.z_dim, text_dim=config.text_dim, freq_dim=32, ffn_dim=64,
        num_layers=config.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6, rope_max_seq_len=64, **image_options).eval()
    _perturb_(transformer, generator)
    vae = AutoencoderKLWan(
        base_dim=config.vae_base_dim, z_dim=config.z_dim, dim_mult=[1, 2, 2], num_res_blocks=1,
        temperal_downsample=[False, True], latents_mean=[0.1 * i for i in range(config.z_dim)],
        latents_std=[1.0 + 0.5 * i for i in range(config.z_dim)],
        scale_factor_spatial=4, scale_factor_temporal=temporal_factor).eval()
    components = dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                      transformer=transformer, scheduler=_build_scheduler(config.scheduler))
    if i2v:
        image_encoder, image_processor = _build_image_encoder(config, generator)
        pipe = WanImageToVideoPipeline(**components, image_encoder=image_encoder,
                                       image_processor=image_processor)
    else:
        pipe = WanPipeline(**components)
    pipe.save_pretrained(output)
    return output
