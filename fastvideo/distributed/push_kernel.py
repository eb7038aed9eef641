"""The Triton kernel of `PeerPushAllToAll`: stores every rank-block of a tensor into its peer.

Imported only when a push exchange runs (CUDA with Triton); the engine imports without it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TILE_WORDS = 4096
"""Words per program: 16 rows of Wan-1.3B's 480p head blocks at sp=2 (32 KB) measured
fastest on 4 H100s (benchmarks/bench_all_to_all.py); larger tiles were slower."""


@triton.jit
def _push_blocks_kernel(src_ptr, dst_ptrs, nb, rows, cols, src_peer_stride, src_b_stride,
                        src_row_stride, dst_offset, BLOCK_ROWS: tl.constexpr,
                        BLOCK_COLS: tl.constexpr):
    """Block `peer` of `src` (`[nb, rows, cols]` words at `src + peer * src_peer_stride`,
    strides `src_b_stride`, `src_row_stride`, 1) -> words `dst_offset`... of peer `peer`'s
    buffer (`dst_ptrs[peer]`), contiguous."""
    peer_b = tl.program_id(2)
    peer = peer_b // nb
    b = peer_b % nb
    r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)[:, None]
    c = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)[None, :]
    mask = (r < rows) & (c < cols)
    src = src_ptr + peer * src_peer_stride + b * src_b_stride
    words = tl.load(src + r * src_row_stride + c, mask=mask)
    dst = tl.load(dst_ptrs + peer).to(tl.pointer_type(src_ptr.dtype.element_ty))
    tl.store(dst + dst_offset + (b * rows + r) * cols + c, words, mask=mask)


def push_blocks(words: torch.Tensor, layout: tuple[int, ...], dst_ptrs: torch.Tensor,
                dst_offset: int) -> None:
    """Launch the push of `words` (the send tensor viewed as words, its blocks described by
    `layout` = (peers, nb, rows, cols, peer stride, b stride, row stride)) into the buffers
    whose addresses `dst_ptrs` holds, each block at word `dst_offset`."""
    peers, nb, rows, cols, peer_stride, b_stride, row_stride = layout
    block_cols = min(triton.next_power_of_2(cols), 256)
    block_rows = max(1, min(32, _TILE_WORDS // block_cols, triton.next_power_of_2(rows)))
    grid = (triton.cdiv(rows, block_rows), triton.cdiv(cols, block_cols), peers * nb)
    _push_blocks_kernel[grid](words, dst_ptrs, nb, rows, cols, peer_stride, b_stride,
                              row_stride, dst_offset, BLOCK_ROWS=block_rows,
                              BLOCK_COLS=block_cols)
