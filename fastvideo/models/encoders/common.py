"""What our text encoders share: their output, the padding/causal mask, attention on the
rank's heads, and loading transformers-named checkpoint tensors into sharded parameters."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


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
    where not (padding keys, and future keys when `causal`). None when nothing is masked.

    A finite minimum rather than -inf, as transformers' eager path: a query whose keys are
    all masked (a left-padded row under a causal mask) then averages instead of giving NaN.
    """
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
                    num_kv_heads: int, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """SDPA over this rank's heads: `q` `[B, S, num_heads * D]`, `k`/`v` `[B, S,
    num_kv_heads * D]` (grouped-query when fewer) -> `[B, S, num_heads * D]`."""
    batch, seq_len, _ = q.shape
    q, k, v = (t.unflatten(-1, (n, -1)).transpose(1, 2)
               for t, n in ((q, num_heads), (k, num_kv_heads), (v, num_kv_heads)))
    if bias is not None:
        bias = bias.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale,
                                         enable_gqa=num_kv_heads != num_heads)
    return out.transpose(1, 2).reshape(batch, seq_len, -1)


# A checkpoint name -> (our parameter name, shard id for a fused parameter's weight_loader).
NameMap = Callable[[str], tuple[str, int | str | None]]


def regex_name_map(renames: dict[str, tuple[str, str | None]]) -> NameMap:
    """A `NameMap` from `pattern -> (replacement, shard)`; the first pattern that matches
    wins, a name none matches is kept. `shard` (a template like the replacement, e.g.
    r"\3" or "0") gives the shard id of a fused parameter: "q", "k", "v", or an index."""
    compiled = [(re.compile(pattern), target) for pattern, target in renames.items()]

    def map_name(name: str) -> tuple[str, int | str | None]:
        for pattern, (replacement, shard) in compiled:
            match = pattern.search(name)
            if match is None:
                continue
            mapped = pattern.sub(replacement, name, count=1)
            if shard is None:
                return mapped, None
            shard_id = match.expand(shard)
            return mapped, int(shard_id) if shard_id.isdigit() else shard_id
        return name, None

    return map_name


def load_named_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                       map_name: NameMap, ignored: re.Pattern[str] | None = None,
                       ) -> tuple[set[str], set[str]]:
    """Load checkpoint tensors through each parameter's `weight_loader` (which slices the
    full tensor for this rank). Returns (missing parameter names, unexpected checkpoint
    names); a fused parameter counts as loaded once any of its parts is. A shape mismatch
    raises ValueError naming the checkpoint tensor."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    unexpected: set[str] = set()
    for ckpt_name, tensor in weights:
        if ignored is not None and ignored.search(ckpt_name):
            continue
        name, shard_id = map_name(ckpt_name)
        param = params.get(name)
        if param is None:
            unexpected.add(ckpt_name)
            continue
        weight_loader = getattr(param, "weight_loader", None)
        with torch.no_grad():
            try:
                if shard_id is not None:
                    weight_loader(param, tensor, shard_id)
                elif weight_loader is not None:
                    weight_loader(param, tensor)
                elif param.shape != tensor.shape:
                    raise ValueError(f"shape mismatch: parameter {tuple(param.shape)}, "
                                     f"checkpoint {tuple(tensor.shape)}")
                else:
                    param.copy_(tensor)
            except ValueError as e:
                raise ValueError(f"{ckpt_name}: {e}") from None
        loaded.add(name)
    return set(params) - loaded, unexpected

