"""Compiling the repeated blocks of a model with `torch.compile`.

Compiling each block, not the whole model, keeps compile time to one block's worth (all
blocks share the code, so they share the compiled graph) and leaves the per-call Python
around them (patchify, RoPE tables, sequence sharding) free to vary. Shapes are static:
one compile per video shape, none from step to step or item to item (a model may declare
a size that varies per item dynamic, see `compile_repeated_blocks`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks to compile: `model._repeated_blocks` names their classes; else `model.blocks`."""
    names = getattr(model, "_repeated_blocks", None)
    if names:
        return [m for m in model.modules() if type(m).__name__ in names]
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.ModuleList):
        return list(blocks)
    raise ValueError(f"{type(model).__name__} has no repeated blocks to compile "
                     "(set `_repeated_blocks` or give it a `blocks` ModuleList)")


def compile_repeated_blocks(model: nn.Module, mode: str | None = None, *,
                            dtype: torch.dtype | None = None) -> int:
    """Compile every repeated block in place; returns how many were compiled.

    Without a `mode`, Inductor also tunes the block sizes of its generated kernels
    (coordinate descent): the norm/RoPE/modulation kernels of a Wan-1.3B block at 480p ran
    ~25% faster on an H100, for a few more seconds of compiling per shape.

    `dtype`: the activations' dtype. Given, the attention layers choose their backends
    first (`select_attention_backends`), so each block compiles to one graph; else they
    choose inside the first trace, which splits every block around its attention.
    """
    if dtype is not None:
        from fastvideo.attention.layer import select_attention_backends

        select_attention_backends(model, dtype)
    blocks = repeated_blocks(model)
    _skip_first_call_aliasing_check()
    # torch.compile takes a mode or Inductor options, not both.
    tuning = {"options": {"coordinate_descent_tuning": True}} if mode is None else {"mode": mode}
    # A model whose blocks see a size that varies from item to item (HunyuanVideo's text
    # length) says `_compile_dynamic = None`: the first change makes that size symbolic (one
    # recompile) instead of a graph per value.
    dynamic = getattr(model, "_compile_dynamic", False)
    for block in blocks:
        block.compile(fullgraph=False, dynamic=dynamic, **tuning)
    logger.info("compiling %d %s blocks with torch.compile (first call is slow)",
                len(blocks), type(model).__name__)
    return len(blocks)


def _skip_first_call_aliasing_check() -> None:
    """Newer PyTorch runs each compiled graph's first call under a dispatch mode that checks
    that custom ops do not alias their inputs. Sliding tile attention's op builds its block
    masks there (FlexAttention's `create_block_mask`, which uses vmap), and vmap under that
    mode fails ("NYI: querying is_contiguous inside of vmap"). Our ops' outputs are new
    tensors (their own tests check it), so the check is off; PyTorch without it is unchanged."""
    import torch._functorch.config as functorch_config

    if hasattr(functorch_config, "check_custom_op_aliasing"):
        functorch_config.check_custom_op_aliasing = False
