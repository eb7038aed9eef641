"""FlashAttention's CuTe kernels (package `flash-attn-4`, module `flash_attn.cute`).

On Hopper (SM90) and Blackwell (SM100) they run dense attention faster than cuDNN's
kernel and take a FlexAttention-style block mask, which makes them the GPU kernel of
Sliding Tile Attention when installed (`benchmarks/RESULTS.md`). Both are registered as
torch custom ops so a compiled DiT keeps them in its graph as opaque kernels.

Nothing here imports the package until a kernel is asked for: the engine runs without it.
"""

from __future__ import annotations

import functools
import importlib
import logging
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

import torch

logger = logging.getLogger(__name__)

CUTE_MODULE = "flash_attn.cute.interface"
CUTE_ARCHES = (9, 10, 11)
"""Compute capability majors the CuTe kernels are built for (Hopper, Blackwell)."""


@functools.cache
def _import_failure() -> str | None:
    try:
        importlib.import_module(CUTE_MODULE)
    except Exception as e:  # noqa: BLE001 - any failure means "not usable", with its reason
        return f"{CUTE_MODULE} does not import ({type(e).__name__}: {e})"
    return None


@torch.compiler.assume_constant_result
def cute_unavailable_reason(device: torch.device | str, dtype: torch.dtype | None = None,
                            head_size: int | None = None) -> str | None:
    """Why the CuTe kernels cannot run here, or None when they can. A constant to
    `torch.compile`, which would otherwise break the graph at the import probe."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"needs a CUDA device, got {device.type}"
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        return f"needs fp16 or bf16, got {dtype}"
    if head_size is not None and (head_size > 256 or head_size % 8):
        return f"needs a head size that is a multiple of 8 up to 256, got {head_size}"
    failure = _import_failure()  # before touching the device: selection may only name it
    if failure is not None:
        return failure
    major, minor = _capability(device)
    if major not in CUTE_ARCHES:
        return f"built for compute capability {CUTE_ARCHES}.x, this GPU is {major}.{minor}"
    return None


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


_seen: set[Hashable] = set()
_seen_lock = threading.Lock()


def logged_first_call(kind: str, key: Hashable, call: Callable[[], Any]) -> Any:
    """`call()`; the first time per (`kind`, `key`) in this process its host time goes to
    the log: a CuTe kernel compiles (or loads from its disk cache) on its first call for
    a shape, on a fresh worker's first video's critical path."""
    if (kind, key) in _seen:  # every later call: no lock
        return call()
    with _seen_lock:
        first = (kind, key) not in _seen
        _seen.add((kind, key))
    if not first:
        return call()
    start = time.perf_counter()
    result = call()
    logger.info("FlashAttention CuTe %s kernel %s: first call %.2f s on the host (its compile, "
                "or its load from the kernel cache)", kind, key, time.perf_counter() - start)
    return result


def _interface() -> Any:
    return importlib.import_module(CUTE_MODULE)


SM90_DENSE_HEAD128_CONFIG: dict[str, Any] = {
    "tile_mn": (192, 128), "num_threads": 512, "intra_wg_overlap": False}
"""Dense, non-causal, head size 128 on Hopper: 192-query tiles over three consumer
warpgroups instead of the package's 128 x 128 over two. 1-2% faster at Wan's shapes on an
H100 (benchmarks/RESULTS.md) and the same output bit for bit (same 128-key steps)."""


def dense_kernel_config(capability_major: int, head_size: int, causal: bool) -> dict[str, Any]:
    """Kernel options for dense attention; empty means the package's own choice."""
    if capability_major == 9 and head_size == 128 and not causal:
        return SM90_DENSE_HEAD128_CONFIG
    return {}


@torch.library.custom_op("fastvideo::flash_cute_attention", mutates_args=())
def flash_cute_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         scale: float, causal: bool) -> torch.Tensor:
    """Dense attention on `[B, S, H, D]` tensors."""
    config = dense_kernel_config(_capability(query.device)[0], query.shape[-1], causal)
    out, *_ = logged_first_call(
        "dense", (tuple(query.shape), tuple(key.shape), query.dtype, causal),
        lambda: _interface()._flash_attn_fwd(query, key, value, softmax_scale=scale,
                                             causal=causal, **config))
    return out


@flash_cute_attention.register_fake
def _(query, key, value, scale, causal):
    return query.new_empty(*query.shape[:-1], value.shape[-1])


@functools.cache
def _key_mask_mod() -> Any:
    """The CuTe mask_mod keeping the keys whose entry of `aux_tensors[0]` is non-zero.

    One table load per score; the same test in integer arithmetic on the tile coordinates
    made the kernel 2.5x slower (benchmarks/RESULTS.md). The kernel applies it only inside
    blocks the block mask marks partial, and may read up to a block past the sequence."""
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute import utils

    @cute.jit
    def key_is_real(b_idx, h_idx, q_idx, kv_idx, seqlen_info, aux_tensors):
        real = aux_tensors[0]
        return (utils.scalar_to_ssa(real[kv_idx[0]], cutlass.Int32)
                > utils.scalar_to_ssa(0, cutlass.Int32))

    return key_is_real


@torch.library.custom_op("fastvideo::flash_cute_block_sparse_attention", mutates_args=())
def flash_cute_block_sparse_attention(query: torch.Tensor, key: torch.Tensor,
                                      value: torch.Tensor, kv_num_blocks: torch.Tensor,
                                      kv_indices: torch.Tensor,
                                      full_kv_num_blocks: torch.Tensor | None,
                                      full_kv_indices: torch.Tensor | None,
                                      key_is_real: torch.Tensor, block_size: int,
                                      scale: float) -> torch.Tensor:
    """Block-sparse attention on `[B, L, H, D]` tensors over the blocks of a FlexAttention
    `BlockMask` (its index tensors, `block_size` square blocks): full blocks attended whole,
    partial blocks only at the keys where `key_is_real` (int32, at least `L + block_size`
    long) is non-zero."""
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    sparse = BlockSparseTensorsTorch(kv_num_blocks, kv_indices, full_kv_num_blocks,
                                     full_kv_indices, block_size=(block_size, block_size))
    out, *_ = logged_first_call(
        "block-sparse masked", (tuple(query.shape), query.dtype, block_size),
        lambda: _interface()._flash_attn_fwd(
            query, key, value, softmax_scale=scale, block_sparse_tensors=sparse,
            mask_mod=_key_mask_mod(), aux_tensors=[key_is_real]))
    return out


@flash_cute_block_sparse_attention.register_fake
def _(query, key, value, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
      key_is_real, block_size, scale):
    return query.new_empty(*query.shape[:-1], value.shape[-1])


@torch.library.custom_op("fastvideo::flash_cute_block_sparse_unmasked", mutates_args=())
def flash_cute_block_sparse_unmasked(query: torch.Tensor, key: torch.Tensor,
                                     value: torch.Tensor, kv_num_blocks: torch.Tensor,
                                     kv_indices: torch.Tensor,
                                     full_kv_num_blocks: torch.Tensor | None,
                                     full_kv_indices: torch.Tensor | None, block_size: int,
                                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention on `[B, L, H, D]` tensors over every key of the listed blocks
    (no mask inside them; keys past `L` excepted): (out, its log-sum-exp `[B, H, L]`, fp32,
    natural log). Callers correct for keys they did not want (`sliding_tile`)."""
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    sparse = BlockSparseTensorsTorch(kv_num_blocks, kv_indices, full_kv_num_blocks,
                                     full_kv_indices, block_size=(block_size, block_size))
    out, lse, *_ = logged_first_call(
        "block-sparse", (tuple(query.shape), query.dtype, block_size),
        lambda: _interface()._flash_attn_fwd(query, key, value, softmax_scale=scale,
                                             block_sparse_tensors=sparse, return_lse=True))
    return out, lse


@flash_cute_block_sparse_unmasked.register_fake
def _(query, key, value, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
      block_size, scale):
    batch, length, heads, _ = query.shape
    return (query.new_empty(*query.shape[:-1], value.shape[-1]),
            query.new_empty(batch, heads, length, dtype=torch.float32))
