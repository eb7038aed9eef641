"""T5 and UMT5 encoders (the same math as transformers' `T5EncoderModel`/`UMT5EncoderModel`),
sharded by attention heads and feed-forward width over the tensor parallel group.

The two differ in one place: T5 learns one relative position bias, in the first layer, and
every layer reuses it; UMT5 learns one per layer. Attention scores are not scaled (T5 folds
the scale into its initialisation). As transformers loaded in fp16 (not bf16), `wo` stays in
fp32 (`to_compute_dtype`), which makes the residual stream fp32 from the first feed-forward.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from fastvideo.distributed import divide, get_tp_rank, get_tp_world_size
from fastvideo.layers.activation import get_act_fn
from fastvideo.layers.layernorm import T5RMSNorm
from fastvideo.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    _load_shard,
)
from fastvideo.layers.vocab_parallel_embedding import VocabParallelEmbedding
from fastvideo.models.config_fields import used_fields
from fastvideo.models.encoders.common import (
    EncoderOutput,
    TransformersEncoder,
    attention_bias,
    local_attention,
)
from fastvideo.models.loader.weight_utils import regex_name_map


@dataclass(frozen=True, kw_only=True)
class T5EncoderConfig:
    """The keys of transformers' `T5Config`/`UMT5Config` the encoder uses, with its defaults."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    """Width of one attention head."""
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    """"relu", "gated-gelu", or any activation, "gated-" in front for the gated FFN."""

    def __post_init__(self) -> None:
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(f"feed_forward_proj must be ACT or gated-ACT, got "
                             f"{self.feed_forward_proj!r}")

    @property
    def is_gated_act(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def dense_act_fn(self) -> str:
        act = self.feed_forward_proj.split("-")[-1]
        # transformers' own alias: "gated-gelu" means the tanh approximation.
        return "gelu_new" if act == "gelu" else act

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> T5EncoderConfig:
        """From a transformers `config.json` dict; keys the encoder does not use (the
        decoder's, generation settings, metadata) are ignored."""
        return cls(**used_fields(cls, config))


class RelativePositionBias(nn.Module):
    """A learnt bias per (relative position bucket, head): `[buckets, heads]`, this rank's
    heads only (the table is sliced along the heads when loaded)."""

    def __init__(self, config: T5EncoderConfig) -> None:
        super().__init__()
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_world_size()
        num_heads = divide(config.num_heads, self.tp_size,
                           "num_heads of the T5 encoder over the tensor parallel size")
        self.weight = nn.Parameter(torch.empty(self.num_buckets, num_heads))
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        _load_shard(param.data, loaded_weight, 1, self.tp_rank, self.tp_size)

    def forward(self, seq_len: int, device: torch.device) -> torch.Tensor:
        """`[1, local heads, S, S]`."""
        position = torch.arange(seq_len, dtype=torch.long, device=device)
        buckets = self._bucket(position[None, :] - position[:, None])
        return self.weight[buckets].permute(2, 0, 1).unsqueeze(0)

    def _bucket(self, relative_position: torch.Tensor) -> torch.Tensor:
        # Mesh TensorFlow's bidirectional bucketing, as transformers: half the buckets per
        # direction; in each, exact buckets for small distances, log-spaced up to max_distance.
        num_buckets = self.num_buckets // 2
        buckets = (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
        max_exact = num_buckets // 2
        log_ratio = (torch.log(distance.float() / max_exact)
                     / math.log(self.max_distance / max_exact) * (num_buckets - max_exact))
        if_large = (max_exact + log_ratio.to(torch.long)).clamp(max=num_buckets - 1)
        return buckets + torch.where(distance < max_exact, distance, if_large)


class T5Attention(nn.Module):
    def __init__(self, config: T5EncoderConfig) -> None:
        super().__init__()
        self.qkv = QKVParallelLinear(config.d_model, config.d_kv, config.num_heads, bias=False)
        self.o = RowParallelLinear(config.num_heads * config.d_kv, config.d_model, bias=False)
        self.num_heads = self.qkv.num_heads

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.o(local_attention(q, k, v, self.num_heads, self.num_heads, bias, scale=1.0))


class T5FeedForward(nn.Module):
    """`wo(act(wi_0 x) * wi_1 x)` (gated) or `wo(act(wi x))`, split along `d_ff`."""

    def __init__(self, config: T5EncoderConfig) -> None:
        super().__init__()
        self.is_gated = config.is_gated_act
        if self.is_gated:
            self.wi = MergedColumnParallelLinear(config.d_model, [config.d_ff] * 2, bias=False)
        else:
            self.wi = ColumnParallelLinear(config.d_model, config.d_ff, bias=False)
        self.act = get_act_fn(config.dense_act_fn)
        self.wo = RowParallelLinear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_gated:
            gate, up = self.wi(x).chunk(2, dim=-1)
            x = self.act(gate) * up
        else:
            x = self.act(self.wi(x))
        # `wo` is fp32 in an fp16 model (see the module docstring).
        return self.wo(x.to(self.wo.weight.dtype))


class T5Block(nn.Module):
    def __init__(self, config: T5EncoderConfig, has_relative_bias: bool) -> None:
        super().__init__()
        self.attn_norm = T5RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.relative_bias = RelativePositionBias(config) if has_relative_bias else None
        self.attn = T5Attention(config)
        self.ffn_norm = T5RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.ffn = T5FeedForward(config)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), bias)
        return x + self.ffn(self.ffn_norm(x))


class _T5EncoderBase(TransformersEncoder):
    """The encoder stack; subclasses say which layers own a relative position bias."""

    config_class = T5EncoderConfig

    _relative_bias_in_every_layer: ClassVar[bool]
    _keep_in_fp32_modules: ClassVar[tuple[str, ...]] = ("wo",)
    # Checkpoint name -> (our name, shard of a fused parameter). The embedding is tied:
    # transformers saves `shared.weight`, older checkpoints also `encoder.embed_tokens.weight`.
    _name_map = staticmethod(regex_name_map({
        r"^(shared|encoder\.embed_tokens)\.weight$": ("embed_tokens.weight", None),
        r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkv])\.weight$":
            (r"blocks.\1.attn.qkv.weight", r"\2"),
        r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.o\.": (r"blocks.\1.attn.o.", None),
        r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.":
            (r"blocks.\1.relative_bias.", None),
        r"^encoder\.block\.(\d+)\.layer\.0\.layer_norm\.": (r"blocks.\1.attn_norm.", None),
        r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_([01])\.weight$":
            (r"blocks.\1.ffn.wi.weight", r"\2"),
        r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.(wi|wo)\.":
            (r"blocks.\1.ffn.\2.", None),
        r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.": (r"blocks.\1.ffn_norm.", None),
        r"^encoder\.final_layer_norm\.": ("final_norm.", None),
    }))
    # A full encoder-decoder checkpoint also holds what an encoder has no use for.
    _ignored_checkpoint_names = re.compile(r"^(decoder\.|lm_head\.)")

    def __init__(self, config: T5EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(
            T5Block(config, self._relative_bias_in_every_layer or i == 0)
            for i in range(config.num_layers))
        self.final_norm = T5RMSNorm(config.d_model, config.layer_norm_epsilon)

    def to_compute_dtype(self, dtype: torch.dtype) -> _T5EncoderBase:
        """Cast parameters to `dtype`; in fp16 `wo` stays fp32 (its outputs overflow fp16),
        as transformers keeps `_keep_in_fp32_modules` for fp16 only."""
        for name, param in self.named_parameters():
            keep = dtype == torch.float16 and any(
                part in self._keep_in_fp32_modules for part in name.split("."))
            param.data = param.data.to(torch.float32 if keep else dtype)
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> EncoderOutput:
        """`input_ids` `[B, S]`, `attention_mask` `[B, S]` (1 = token, 0 = padding)."""
        x = self.embed_tokens(input_ids)
        seq_len = input_ids.shape[1]
        padding = attention_bias(attention_mask, seq_len, torch.float32, x.device, causal=False)
        layer_inputs = []
        bias = None
        for block in self.blocks:
            layer_inputs.append(x)
            if block.relative_bias is not None:
                bias = block.relative_bias(seq_len, x.device)
                bias = bias if padding is None else bias + padding
            x = block(x, bias)
        x = self.final_norm(x)
        # transformers 5: every layer's input, then the final (normed) output.
        hidden_states = (*layer_inputs, x) if output_hidden_states else None
        return EncoderOutput(last_hidden_state=x, hidden_states=hidden_states)


class T5EncoderModel(_T5EncoderBase):
    """T5: the first layer's relative position bias serves every layer."""

    _relative_bias_in_every_layer = False


class UMT5EncoderModel(_T5EncoderBase):
    """UMT5 (Wan's text encoder): every layer has its own relative position bias."""

    _relative_bias_in_every_layer = True
