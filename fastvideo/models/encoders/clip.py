"""CLIP's text encoder (the same math as transformers' `CLIPTextModel`), sharded by attention
heads and MLP width over the tensor parallel group.

Pre-norm layers with a causal mask (plus the padding mask, as transformers applies it), a
final LayerNorm, and `pooler_output` read at each prompt's end-of-text token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastvideo.layers.activation import get_act_fn
from fastvideo.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from fastvideo.layers.vocab_parallel_embedding import VocabParallelEmbedding
from fastvideo.models.config_fields import used_fields
from fastvideo.models.encoders.common import (
    EncoderOutput,
    TransformersEncoder,
    attention_bias,
    local_attention,
)
from fastvideo.models.loader.weight_utils import regex_name_map

# The end-of-text id of configs written before transformers PR #24773, which set it to 2:
# for those, transformers pools at the highest token id (the end-of-text token has the
# highest id in CLIP's vocabulary) instead of looking for `eos_token_id`.
_LEGACY_EOS_TOKEN_ID = 2


@dataclass(frozen=True, kw_only=True)
class CLIPTextConfig:
    """The keys of transformers' `CLIPTextConfig` the encoder uses, with its defaults."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> CLIPTextConfig:
        """From a `config.json` dict: a `CLIPTextConfig`, or a full `CLIPConfig` (its
        `text_config` is taken). Keys the encoder does not use are ignored."""
        return cls(**used_fields(cls, config.get("text_config", config)))


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        head_dim = config.hidden_size // config.num_attention_heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim,
                                          config.num_attention_heads)
        self.out_proj = RowParallelLinear(config.hidden_size, config.hidden_size)
        self.num_heads = self.qkv_proj.num_heads
        self.scale = head_dim**-0.5

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).chunk(3, dim=-1)
        out = local_attention(q, k, v, self.num_heads, self.num_heads, bias, self.scale,
                              causal=True)
        return self.out_proj(out)


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.fc1 = ColumnParallelLinear(config.hidden_size, config.intermediate_size)
        self.act = get_act_fn(config.hidden_act)
        self.fc2 = RowParallelLinear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), bias)
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextModel(TransformersEncoder):
    """`forward` returns the final-normed tokens and `pooler_output`, the end-of-text token's."""

    config_class = CLIPTextConfig

    # transformers 5 saves without a prefix; earlier versions (and CLIPModel) under `text_model.`.
    _name_map = staticmethod(regex_name_map({
        r"^(text_model\.)?encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.":
            (r"layers.\2.self_attn.qkv_proj.", r"\3"),
        r"^(text_model\.)?encoder\.layers\.": ("layers.", None),
        r"^text_model\.": ("", None),
    }))
    # Older checkpoints save the `position_ids` buffer; a CLIPModel also holds its vision tower.
    _ignored_checkpoint_names = re.compile(
        r"(position_ids$|^vision_model\.|^visual_projection\.|^text_projection\.|^logit_scale$)")

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = nn.Module()
        self.embeddings.token_embedding = VocabParallelEmbedding(config.vocab_size,
                                                                 config.hidden_size)
        # Small (77 rows): replicated.
        self.embeddings.position_embedding = nn.Embedding(config.max_position_embeddings,
                                                          config.hidden_size)
        self.layers = nn.ModuleList(CLIPEncoderLayer(config)
                                    for _ in range(config.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> EncoderOutput:
        """`input_ids` `[B, S]` (S at most `max_position_embeddings`), `attention_mask` `[B, S]`."""
        seq_len = input_ids.shape[1]
        if seq_len > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {seq_len} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        positions = torch.arange(seq_len, device=input_ids.device)
        x = (self.embeddings.token_embedding(input_ids)
             + self.embeddings.position_embedding(positions))
        bias = attention_bias(attention_mask, seq_len, x.dtype, x.device, causal=True)
        layer_inputs = []
        for layer in self.layers:
            layer_inputs.append(x)
            x = layer(x, bias)
        # transformers 5 (tie_last_hidden_states=False): every layer's input, then the last
        # layer's output before the final norm.
        hidden_states = (*layer_inputs, x) if output_hidden_states else None
        x = self.final_layer_norm(x)
        return EncoderOutput(last_hidden_state=x, hidden_states=hidden_states,
                             pooler_output=x[torch.arange(x.shape[0]), self._eos_index(input_ids)])

    def _eos_index(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.config.eos_token_id == _LEGACY_EOS_TOKEN_ID:
            return input_ids.argmax(dim=-1)
        # The first end-of-text (the pad token may be the same id).
        return (input_ids == self.config.eos_token_id).int().argmax(dim=-1)
