"""Llama's decoder stack used as a text encoder (the same math as transformers' `LlamaModel`),
sharded by attention heads (grouped-query: key/value heads too) and MLP width over the
tensor parallel group.

HunyuanVideo reads a hidden state a few layers from the end (`output_hidden_states=True`),
so `hidden_states` follows transformers 5 exactly (see `forward`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastvideo.layers.activation import get_act_fn
from fastvideo.layers.layernorm import T5RMSNorm
from fastvideo.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from fastvideo.layers.vocab_parallel_embedding import VocabParallelEmbedding
from fastvideo.models.config_fields import used_fields
from fastvideo.models.encoders.common import (
    EncoderOutput,
    TransformersEncoder,
    attention_bias,
    local_attention,
)
from fastvideo.models.loader.weight_utils import regex_name_map

_ROPE_TYPES = ("default", "linear")


@dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """The keys of transformers' `LlamaConfig` the encoder uses, with its defaults."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    """None: as many as `num_attention_heads` (no grouped-query attention)."""
    head_dim: int | None = None
    """None: `hidden_size / num_attention_heads`."""
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    """"default", or "linear" (positions divided by `rope_factor`)."""
    rope_factor: float = 1.0
    attention_bias: bool = False
    mlp_bias: bool = False

    def __post_init__(self) -> None:
        if self.rope_type not in _ROPE_TYPES:
            raise ValueError(f"unsupported rope type {self.rope_type!r}; supported: {_ROPE_TYPES}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> LlamaConfig:
        """From a transformers `config.json` dict. RoPE settings come from `rope_parameters`
        (transformers 5) or `rope_theta` + `rope_scaling` (earlier); other keys the encoder
        does not use are ignored."""
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope.setdefault("rope_theta", config.get("rope_theta", cls.rope_theta))
        kwargs = used_fields(cls, config)
        kwargs.update(rope_theta=rope["rope_theta"],
                      rope_type=rope.get("rope_type", rope.get("type", "default")),
                      rope_factor=rope.get("factor", 1.0))
        return cls(**kwargs)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class LlamaRotaryEmbedding(nn.Module):
    """`(cos, sin)` `[S, head_size]` in the "rotate half" layout transformers' Llama uses
    (the two halves of a head pair up, unlike the interleaved pairs of our DiT's RoPE)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.head_size = config.head_size
        self.theta = config.rope_theta
        self.factor = config.rope_factor if config.rope_type == "linear" else 1.0

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # fp32 as transformers (no buffer, so casting the model cannot round the table).
        exponent = torch.arange(0, self.head_size, 2, dtype=torch.int64, device=device).float()
        inv_freq = 1.0 / self.theta ** (exponent / self.head_size)
        positions = torch.arange(seq_len, device=device).float() / self.factor
        angles = positions[:, None] * inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()


def _apply_rotary(x: torch.Tensor, num_heads: int, cos: torch.Tensor, sin: torch.Tensor
                  ) -> torch.Tensor:
    """Rotate `x` `[B, S, num_heads * D]` by `cos`/`sin` `[S, D]` (rounded to `x.dtype`
    first, as transformers)."""
    heads = x.unflatten(-1, (num_heads, -1))
    cos, sin = cos.to(x.dtype)[:, None], sin.to(x.dtype)[:, None]
    return (heads * cos + _rotate_half(heads) * sin).flatten(-2)


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        head_size = config.head_size
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_size,
                                          config.num_attention_heads, config.num_key_value_heads,
                                          bias=config.attention_bias)
        self.o_proj = RowParallelLinear(config.num_attention_heads * head_size,
                                        config.hidden_size, bias=config.attention_bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.split = [self.num_heads * head_size, self.num_kv_heads * head_size,
                      self.num_kv_heads * head_size]
        self.scale = head_size**-0.5

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        q = _apply_rotary(q, self.num_heads, *rope)
        k = _apply_rotary(k, self.num_kv_heads, *rope)
        out = local_attention(q, k, v, self.num_heads, self.num_kv_heads, bias, self.scale,
                              causal=True)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [config.intermediate_size] * 2, bias=config.mlp_bias)
        self.act = get_act_fn(config.hidden_act)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size,
                                           bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = T5RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = T5RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), bias, rope)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(TransformersEncoder):
    """`forward` returns the final-normed tokens and, on request, transformers' hidden states."""

    config_class = LlamaConfig

    # `LlamaModel` saves without a prefix, `LlamaForCausalLM` under `model.`.
    _name_map = staticmethod(regex_name_map({
        r"^(model\.)?layers\.(\d+)\.self_attn\.([qkv])_proj\.":
            (r"layers.\2.self_attn.qkv_proj.", r"\3"),
        r"^(model\.)?layers\.(\d+)\.mlp\.gate_proj\.": (r"layers.\2.mlp.gate_up_proj.", "0"),
        r"^(model\.)?layers\.(\d+)\.mlp\.up_proj\.": (r"layers.\2.mlp.gate_up_proj.", "1"),
        r"^model\.": ("", None),
    }))
    _ignored_checkpoint_names = re.compile(r"^lm_head\.")

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config)
                                    for _ in range(config.num_hidden_layers))
        self.norm = T5RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> EncoderOutput:
        """`input_ids` `[B, S]`, `attention_mask` `[B, S]` (1 = token, 0 = padding)."""
        x = self.embed_tokens(input_ids)
        seq_len = input_ids.shape[1]
        bias = attention_bias(attention_mask, seq_len, x.dtype, x.device, causal=True)
        rope = self.rotary_emb(seq_len, x.device)
        layer_inputs = []
        for layer in self.layers:
            layer_inputs.append(x)
            x = layer(x, bias, rope)
        x = self.norm(x)
        # transformers 5: every layer's input, then the final normed output in place of the
        # last layer's (so `hidden_states[-1]` is `last_hidden_state`, and there are
        # num_hidden_layers + 1 entries).
        hidden_states = (*layer_inputs, x) if output_hidden_states else None
        return EncoderOutput(last_hidden_state=x, hidden_states=hidden_states)
