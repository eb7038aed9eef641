"""What our text encoders share: their output, the padding/causal mask, attention on the
rank's heads, and loading transformers-named checkpoint tensors into sharded parameters."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fastvideo.models.loader.weight_utils import NameMap, load_renamed_weights


@dataclass
class EncoderOutput:
    """The fields of transformers' `BaseModelOutput(WithPooling)` our pipelines read."""

    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    """With `output_hidden_states=True`: the input of every layer, then the last output,
    exactly as transformers 5 returns them (see each model's `forward`)."""
    pooler_output: torch.Tensor | None = None


def attention_bias(attention_mask: torch.Tensor | None, seq_len: int, dtype: torch.dtype,
                   device: torch.device, causal: bool) -> torch.Tensor | None:
    """Additive `[B or 1, 1, S, S]` bias: 0 where a query may attend, the dtype's minimum
    where not (padding keys, and future keys when `causal`). None when nothing is masked,
    or when only the future is (then attend with `causal=True`).

    A finite minimum rather than -inf, as transformers' eager path: a query whose keys are
    all masked (a left-padded row under a causal mask) then averages instead of giving NaN.
    """
    if causal and (attention_mask is None or bool(attention_mask.all())):
        # SDPA's own causal flag, as transformers uses when nothing is padded: the same
        # kernel choice (GPU flash/cuDNN kernels take the flag, not an explicit mask).
        return None
    allowed = None
    if attention_mask is not None:
        if attention_mask.shape[-1] != seq_len:
            raise ValueError(f"attention_mask has {attention_mask.shape[-1]} positions, "
                             f"input_ids {seq_len}")
        allowed = attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    if causal:
        tril = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
        allowed = tril[None, None] if allowed is None else allowed & tril
    if allowed is None:
        return None
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
        ~allowed, torch.finfo(dtype).min)


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                    num_kv_heads: int, bias: torch.Tensor | None, scale: float,
                    causal: bool = False) -> torch.Tensor:
    """SDPA over this rank's heads: `q` `[B, S, num_heads * D]`, `k`/`v` `[B, S,
    num_kv_heads * D]` (grouped-query when fewer) -> `[B, S, num_heads * D]`."""
    batch, seq_len, _ = q.shape
    q, k, v = (t.unflatten(-1, (n, -1)).transpose(1, 2)
               for t, n in ((q, num_heads), (k, num_kv_heads), (v, num_kv_heads)))
    if bias is not None:
        bias = bias.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale,
                                         is_causal=causal and bias is None,
                                         enable_gqa=num_kv_heads != num_heads)
    return out.transpose(1, 2).reshape(batch, seq_len, -1)



WARM_UP_TOKENS = 512
"""Dummy tokens of `TransformersEncoder.warm_up_on_device` (Wan's text length)."""


class TransformersEncoder(nn.Module):
    """An encoder built from a transformers `config.json` and loaded from the tensors that
    transformers' `save_pretrained` writes (the loader's `from_config` / `load_weights`)."""

    config_class: ClassVar[Any]
    """Its typed config; `from_dict` takes the `config.json` dict."""
    _name_map: ClassVar[NameMap]
    _ignored_checkpoint_names: ClassVar[re.Pattern[str]]
    """Checkpoint tensors the encoder has no use for (a decoder, an lm head, a vision tower)."""

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TransformersEncoder:
        """Build from a `config.json` dict (parameters uninitialised until loaded)."""
        return cls(cls.config_class.from_dict(config))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]
                     ) -> tuple[set[str], set[str]]:
        """Load transformers-named tensors; returns (missing parameter names, unexpected
        checkpoint names). Each rank keeps its slice."""
        return load_renamed_weights(self, weights, self._name_map, self._ignored_checkpoint_names)

    @torch.no_grad()
    def warm_up_on_device(self, tokens: int = WARM_UP_TOKENS) -> None:
        """One forward on `tokens` dummy tokens (at most the model's positions), output
        dropped: the device's first-call costs (its BLAS library's start, the kernels'
        first loads) paid now, e.g. on a thread while the process imports, instead of in
        the first request's text encoding. Changes nothing in the model."""
        limit = getattr(self.config, "max_position_embeddings", None)
        length = min(tokens, limit) if isinstance(limit, int) and limit > 0 else tokens
        device = next(self.parameters()).device
        ids = torch.zeros(1, length, dtype=torch.long, device=device)
        self(input_ids=ids, attention_mask=torch.ones_like(ids))
