"""The shapes model's components, built from a `ModelConfig`, and the Diffusers folder
(`model_index.json` naming `WanPipeline`) they are saved to."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastvideo.training.shapes_data import all_combinations
from fastvideo.training.tiny_config import ModelConfig


@dataclass
class Components:
    """What a Wan T2V folder holds; the three modules are trained, the rest built once."""

    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    transformer: torch.nn.Module
    scheduler: Any


def build_tokenizer(config: ModelConfig) -> Any:
    """A UMT5-style (Unigram) tokenizer whose pieces are the caption words, so each word is
    one token (one trained on so few sentences splits words into letters)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import T5TokenizerFast

    words = sorted({w for a in all_combinations() for w in a.caption().split()})
    # T5's layout: <pad>, </s>, <unk>, then the pieces; a whole word outscores its letters.
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in words]
    if len(vocab) > config.text.vocab_size:
        raise ValueError(f"vocab_size {config.text.vocab_size} < {len(vocab)}, the caption "
                         f"words and T5's special tokens")
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                           unk_token="<unk>", extra_ids=0)


def build_scheduler(config: ModelConfig) -> Any:
    """Wan's sampler: UniPC predicting the flow (noise - clean), shifted as in training."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                   flow_shift=config.flow_shift, num_train_timesteps=1000)


def _build_modules(config: ModelConfig, tokenizer: Any) -> dict[str, torch.nn.Module]:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    return dict(text_encoder=UMT5EncoderModel(UMT5Config(**config.umt5_kwargs(
                    len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id))),
                vae=AutoencoderKLWan(**config.vae_kwargs()),
                transformer=WanTransformer3DModel(**config.dit_kwargs()))


def build_components(config: ModelConfig, seed: int) -> Components:
    """Freshly initialised components (seeded), in float32 and training mode."""
    tokenizer = build_tokenizer(config)
    torch.manual_seed(seed)
    return Components(tokenizer=tokenizer, scheduler=build_scheduler(config),
                      **_build_modules(config, tokenizer))


def num_parameters(modules: dict[str, torch.nn.Module]) -> dict[str, int]:
    return {name: sum(p.numel() for p in module.parameters()) for name, module in modules.items()}


def estimate_size_mb(config: ModelConfig) -> float:
    """Size of the saved weights in MB: parameters times the bytes of `save_dtype`."""
    bytes_per = torch.finfo(getattr(torch, config.save_dtype)).bits // 8
    tokenizer = build_tokenizer(config)
    with torch.device("meta"):
        counts = num_parameters(_build_modules(config, tokenizer))
    return sum(counts.values()) * bytes_per / 1e6


def _cast_for_saving(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A CPU copy in `dtype`, except the parameters diffusers keeps in float32 (the Wan DiT's
    norms, timestep embedder and modulation table), which lose too much in bf16."""
    module = copy.deepcopy(module).to("cpu").eval()
    keep = getattr(module, "_keep_in_fp32_modules", None) or []
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_floating_point() and not any(k in name.split(".") for k in keep):
            tensor.data = tensor.data.to(dtype)
    return module


def write_pipeline(output: str | Path, components: Components, config: ModelConfig) -> Path:
    """Save a `WanPipeline` folder from copies cast to `save_dtype` (the caller's training
    modules are untouched)."""
    from diffusers import WanPipeline

    dtype = getattr(torch, config.save_dtype)
    modules = {name: _cast_for_saving(getattr(components, name), dtype)
               for name in ("text_encoder", "vae", "transformer")}
    pipe = WanPipeline(tokenizer=components.tokenizer, scheduler=components.scheduler, **modules)
    pipe.save_pretrained(output, safe_serialization=True)
    return Path(output)
