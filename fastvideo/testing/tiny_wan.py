"""Writes a complete, tiny Wan2.1 T2V checkpoint in Diffusers format.

Every component is built with its own library's class and saved with its own
`save_pretrained`, so the folder layout is exactly a real checkpoint's; only the sizes
are small and the weights random. The tokenizer is trained here, on a few sentences,
because nothing may be downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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


@dataclass(frozen=True)
class TinyWanConfig:
    """Sizes of the tiny model (defaults run a 64x64, 9-frame video in seconds on a CPU)."""

    z_dim: int = 4
    text_dim: int = 32
    num_layers: int = 2
    num_heads: int = 2
    head_dim: int = 16
    vae_base_dim: int = 8
    vocab_size: int = 64
    scheduler: str = "unipc"  # or "euler" (flow-match Euler)
    seed: int = 0


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


def make_tiny_wan(output: str | Path, config: TinyWanConfig | None = None) -> Path:
    """Write the checkpoint to `output` (created if needed) and return its path."""
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    config = config or TinyWanConfig()
    output = Path(output)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)

    tokenizer = _build_tokenizer(config.vocab_size)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=config.text_dim, d_kv=8, d_ff=64, num_layers=2,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)).eval()
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=config.num_heads,
        attention_head_dim=config.head_dim, in_channels=config.z_dim,
        out_channels=config.z_dim, text_dim=config.text_dim, freq_dim=32, ffn_dim=64,
        num_layers=config.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6, rope_max_seq_len=64).eval()
    _perturb_(transformer, generator)
    vae = AutoencoderKLWan(
        base_dim=config.vae_base_dim, z_dim=config.z_dim, dim_mult=[1, 2, 2], num_res_blocks=1,
        temperal_downsample=[False, True], latents_mean=[0.1 * i for i in range(config.z_dim)],
        latents_std=[1.0 + 0.5 * i for i in range(config.z_dim)],
        scale_factor_spatial=4, scale_factor_temporal=2).eval()
    if config.scheduler == "unipc":
        scheduler = UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
            num_train_timesteps=1000)
    elif config.scheduler == "euler":
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, num_train_timesteps=1000)
    else:
        raise ValueError(f"unknown scheduler {config.scheduler!r}; use 'unipc' or 'euler'")
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                       transformer=transformer, scheduler=scheduler)
    pipe.save_pretrained(output)
    return output
