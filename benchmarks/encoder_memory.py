"""Weight memory per GPU of our text encoders at tensor parallel sizes 1, 2, 4 (no GPU needed).

    python benchmarks/encoder_memory.py                 # the table in docs/text_encoders.md
    python benchmarks/encoder_memory.py --tp 1 2 4 8 --dtype float32

Each model is built on `torch.device("meta")` (no memory) at tp = 1, and every parameter is
sized for one rank with the sharding rule of the layer that owns it (`per_rank_numel`), the
rules the parallel layers apply when built in a tp group, in the dtype the loader gives it
(`to_compute_dtype`: in fp16, T5/UMT5 keep `wo` in fp32, as transformers does). tests/distributed/test_tp_encoders.py
checks this count against the parameters a real tp = 2 rank holds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `fastvideo` without installing the repo

from fastvideo.distributed import divide  # noqa: E402
from fastvideo.layers.linear import (  # noqa: E402
    ColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from fastvideo.layers.vocab_parallel_embedding import (  # noqa: E402
    VocabParallelEmbedding,
    pad_vocab_size,
)
from fastvideo.models.encoders.llama import LlamaModel  # noqa: E402
from fastvideo.models.encoders.t5 import RelativePositionBias, UMT5EncoderModel  # noqa: E402

# The `config.json` keys that matter for the weights; the rest take transformers' defaults.
PRESETS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "UMT5-XXL (Wan)": (UMT5EncoderModel, dict(
        vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
        relative_attention_num_buckets=32, feed_forward_proj="gated-gelu")),
    "Llama-3-8B class (HunyuanVideo)": (LlamaModel, dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0)),
}


def _rank_rows(module: nn.Module, tp_size: int) -> int:
    """Output rows one rank holds of a column-parallel layer."""
    if isinstance(module, QKVParallelLinear):
        heads = divide(module.total_num_heads, tp_size, "attention heads over the tp size")
        kv_heads = (1 if tp_size >= module.total_num_kv_heads
                    else divide(module.total_num_kv_heads, tp_size, "kv heads over the tp size"))
        return (heads + 2 * kv_heads) * module.head_size
    return divide(module.output_size, tp_size, "output features over the tp size")


def _param_numel(module: nn.Module, name: str, param: nn.Parameter, tp_size: int) -> int:
    """Elements of `module`'s own parameter `name` on one rank at `tp_size`."""
    if isinstance(module, ColumnParallelLinear):  # QKV and Merged too; bias split as weight
        rows = _rank_rows(module, tp_size)
        return rows * module.input_size if name == "weight" else rows
    if isinstance(module, RowParallelLinear) and name == "weight":  # the bias is replicated
        return module.output_size * divide(module.input_size, tp_size,
                                           "input features over the tp size")
    if isinstance(module, VocabParallelEmbedding):
        return pad_vocab_size(module.num_embeddings, tp_size) // tp_size * module.embedding_dim
    if isinstance(module, RelativePositionBias):
        return param.shape[0] * divide(param.shape[1], tp_size, "T5 heads over the tp size")
    return param.numel()


def per_rank_numel(model: nn.Module, tp_size: int) -> int:
    """Parameters one rank holds at `tp_size`, for `model` built at tp = 1."""
    return sum(_param_numel(module, name, param, tp_size) for module in model.modules()
               for name, param in module.named_parameters(recurse=False))


def per_rank_bytes(model: nn.Module, tp_size: int) -> int:
    """Bytes of the parameters one rank holds at `tp_size`, in their current dtypes."""
    return sum(_param_numel(module, name, param, tp_size) * param.element_size()
               for module in model.modules()
               for name, param in module.named_parameters(recurse=False))


def build_on_meta(cls: type[nn.Module], config: dict[str, Any], dtype: torch.dtype
                  ) -> nn.Module:
    """The model in the dtypes the loader gives it (in fp16 T5 keeps `wo` fp32), on `meta`."""
    with torch.device("meta"):
        model = cls.from_config(config)
    return model.to_compute_dtype(dtype) if hasattr(model, "to_compute_dtype") else model.to(dtype)


def memory_table(tp_sizes: list[int], dtype: torch.dtype) -> list[dict[str, Any]]:
    rows = []
    for name, (cls, config) in PRESETS.items():
        model = build_on_meta(cls, config, dtype)
        for tp in tp_sizes:
            rows.append({"model": name, "tp": tp, "params_per_rank": per_rank_numel(model, tp),
                         "gib_per_rank": per_rank_bytes(model, tp) / 2**30})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                        default="bfloat16")
    args = parser.parse_args()
    print(f"| model | tp | parameters per GPU | weights per GPU ({args.dtype}) |")
    print("|---|---|---|---|")
    for row in memory_table(args.tp, getattr(torch, args.dtype)):
        print(f"| {row['model']} | {row['tp']} | {row['params_per_rank'] / 1e9:.3f} B | "
              f"{row['gib_per_rank']:.2f} GiB |")


if __name__ == "__main__":
    main()
