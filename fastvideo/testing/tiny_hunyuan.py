"""Writes a complete, tiny HunyuanVideo text-to-video checkpoint in Diffusers format.

As for `tiny_wan`: every component is its own library's class saved with its own
`save_pretrained`, so the folder is laid out as the real one (`hunyuanvideo-community/
HunyuanVideo`); only the sizes are small and the weights random. Both tokenizers are
trained here on a few sentences, because nothing may be downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastvideo.testing.tiny_wan import _CORPUS, _perturb_

# The Llama-3 special tokens HunyuanVideo's prompt template uses, kept whole by the tokenizer.
_LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>", "<pad>"]


@dataclass(frozen=True)
class TinyHunyuanConfig:
    """Sizes of the tiny model (defaults run a 32x32, 5-frame video in seconds on a CPU)."""

    latent_channels: int = 4
    llama_dim: int = 32
    """The DiT's `text_embed_dim`."""
    llama_layers: int = 3
    """More than the two layers the pipeline skips, so a real layer's output is used."""
    clip_dim: int = 24
    """The DiT's `pooled_projection_dim` (differs from `llama_dim`, so a swap fails)."""
    num_heads: int = 2
    head_dim: int = 16
    vocab_size: int = 300
    seed: int = 0


def _train_llama_tokenizer(vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaTokenizerFast

    from fastvideo.pipelines.hunyuan.family import PROMPT_TEMPLATE

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.BPEDecoder()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=["<unk>", *_LLAMA_SPECIALS])
    tokenizer.train_from_iterator([*_CORPUS, PROMPT_TEMPLATE.template], trainer=trainer)
    bos = tokenizer.token_to_id("<|begin_of_text|>")
    # Llama-3 starts every text with its BOS token and appends nothing.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
    return LlamaTokenizerFast(tokenizer_object=tokenizer, bos_token="<|begin_of_text|>",
                              eos_token="<|end_of_text|>", pad_token="<pad>",
                              unk_token="<unk>", padding_side="right", add_bos_token=False,
                              add_eos_token=False)


def _train_clip_tokenizer() -> Any:
    """A BPE vocabulary with CLIP's end-of-word suffix, in CLIP's own tokenizer class (which
    brings CLIP's lower-casing and splitting)."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    tokenizer = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=200, end_of_word_suffix="</w>",
                                  special_tokens=["<|startoftext|>", "<|endoftext|>"])
    tokenizer.train_from_iterator([s.lower() for s in _CORPUS], trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return CLIPTokenizer(vocab=model["vocab"], merges=merges, model_max_length=77)


def make_tiny_hunyuan(output: str | Path, config: TinyHunyuanConfig | None = None) -> Path:
    """Write the checkpoint to `output` (created if needed) and return its path."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    config = config or TinyHunyuanConfig()
    output = Path(output)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)

    tokenizer = _train_llama_tokenizer(config.vocab_size)
    text_encoder = LlamaModel(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.llama_dim, intermediate_size=64,
        num_hidden_layers=config.llama_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)).eval()
    tokenizer_2 = _train_clip_tokenizer()
    text_encoder_2 = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer_2), hidden_size=config.clip_dim, intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
        projection_dim=16, bos_token_id=tokenizer_2.bos_token_id,
        eos_token_id=tokenizer_2.eos_token_id, pad_token_id=tokenizer_2.pad_token_id)).eval()
    _perturb_(text_encoder, generator)
    _perturb_(text_encoder_2, generator)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=config.latent_channels, out_channels=config.latent_channels,
        num_attention_heads=config.num_heads, attention_head_dim=config.head_dim,
        num_layers=1, num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2,
        patch_size_t=1, guidance_embeds=True, text_embed_dim=config.llama_dim,
        pooled_projection_dim=config.clip_dim, rope_axes_dim=(4, 6, 6)).eval()
    _perturb_(transformer, generator)
    # Four blocks: three spatial (8x) and two temporal (4x) downsamplings, as the real VAE.
    vae = AutoencoderKLHunyuanVideo(
        latent_channels=config.latent_channels, block_out_channels=(8, 8, 16, 16),
        layers_per_block=1, norm_num_groups=4, scaling_factor=0.476986).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0, num_train_timesteps=1000)
    HunyuanVideoPipeline(
        text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
        scheduler=scheduler, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
    ).save_pretrained(output)
    return output
