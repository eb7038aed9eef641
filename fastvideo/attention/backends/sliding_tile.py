"""Sliding Tile Attention (STA) on PyTorch FlexAttention, for any latent shape.

The video tokens of a `(T, H, W)` latent grid (row-major, as the DiT flattens them) are
padded to whole tiles of `tile_size` positions and reordered tile by tile; each tile then
fills one block of `block_size` tokens of the FlexAttention block mask, its last
`block_size - tile_volume` tokens being padding. So the tile need not have 128 positions
(the GPU kernel's block): a tile that fits the grid better (`choose_tile_size`) pads less
overall. A query tile attends the `window` tiles around it along each axis; at the borders
the window is shifted to stay inside the grid at full size (as the STA paper does), and a
window larger than the grid is clamped to it, i.e. attends the whole axis. Text tokens,
appended after the video tokens, are attended by all queries and attend everything (each
direction configurable). Padding keys are never attended; padding query rows are dropped
from the output, which comes back in the input's token order.

Windows may differ per head: the mask_mod reads the window of head `h` from a small tensor,
so all heads run in one kernel launch with a per-head block mask (one mask per distinct
window would need one launch per head group plus gathers of the head subsets). Block masks
and the reorder indices are built once per (shape, windows, device) and cached; on GPU the
kernel is the compiled FlexAttention kernel, which never visits the blocks outside the
windows, so inside the blocks it does visit only padding keys remain to be masked.

The kernel: FlashAttention's CuTe block-sparse kernel (`flash_cute`) where it runs (Hopper
and Blackwell with `flash-attn-4` installed; ~1.4x FlexAttention's speed at Wan 480p), else
the compiled FlexAttention kernel; `FASTVIDEO_STA_KERNEL` (auto, flex, flash_cute) forces
one. Timings against cuDNN dense attention: `benchmarks/bench_attention.py` and
`benchmarks/RESULTS.md`.

Under sequence parallelism the backend sees the full sequence and a contiguous slice of the
heads (after the Ulysses all-to-all); `AttentionMetadata.head_offset` (global index of
local head 0, set by `DistributedAttention`) makes per-head windows refer to global heads.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from fastvideo.attention.backends.abstract import AttentionBackend, AttentionImpl, _Backend
from fastvideo.attention.backends.flash_cute import (
    cute_unavailable_reason,
    flash_cute_attention,
    flash_cute_block_sparse_attention,
    flash_cute_block_sparse_unmasked,
)
from fastvideo.attention.metadata import AttentionMetadata, sta_config_for_key
from fastvideo.attention.sta_config import (
    KERNEL_BLOCK,
    STAConfig,
    Window,
    parse_window,
    resolve_tile_size,
)

Grid = tuple[int, int, int]

STA_KERNEL_ENV = "FASTVIDEO_STA_KERNEL"
STA_KERNELS = ("auto", "flex", "flash_cute")
"""auto: FlashAttention's CuTe kernel where it runs, else FlexAttention."""

STA_PADDING_ENV = "FASTVIDEO_STA_PADDING"
STA_PADDINGS = ("rescale", "mask")
"""How the CuTe kernel leaves out the padding keys of a tile's block. rescale: the padding
keys are zeros, attended unmasked (each adds exp(0) to a row's softmax sum and nothing to
its output), and each output row is scaled by S / (S - n) afterwards, S = exp(lse) and n
the padding keys the row attended: no mask inside the kernel (at Wan 480p on an H200 the
STA call is 9-12% faster, a sparse DiT forward 6%).
mask: the kernel masks them (a table read per score), exact but slower. rescale loses
precision only for a row whose real keys' mass S - n is tiny against n (every real score
below about -log(real keys / n), ~ -4 at Wan 480p with 25% density): rows with that little
mass are unheard of with RMS-normed q and k, and S - n is kept >= 1e-6 S."""

_MIN_REAL_MASS = 1e-6


@dataclass(frozen=True)
class TileLayout:
    """Where each token of a `grid` (+ `num_text_tokens`) sits once reordered into tiles."""

    grid: Grid
    tile_size: Window
    num_text_tokens: int = 0
    block_size: int | None = None
    """Tokens per tile in the tiled sequence (the block mask's block), at least the tile's
    volume; the rest of each block is padding. None: the tile's volume."""

    def __post_init__(self) -> None:
        # Tuples whatever came in: layouts are cache keys.
        object.__setattr__(self, "grid", parse_window(self.grid, "grid"))
        object.__setattr__(self, "tile_size", parse_window(self.tile_size, "tile_size"))
        if self.num_text_tokens < 0:
            raise ValueError(f"num_text_tokens must be >= 0, got {self.num_text_tokens}")
        if self.block_size is None:
            object.__setattr__(self, "block_size", self.tile_volume)
        elif self.block_size < self.tile_volume:
            raise ValueError(f"block_size {self.block_size} is smaller than tile_size "
                             f"{self.tile_size} ({self.tile_volume} tokens)")

    @property
    def tile_grid(self) -> Grid:
        """Tiles along (t, h, w), the last one of an axis possibly partly padding."""
        return tuple(-(-n // t) for n, t in zip(self.grid, self.tile_size))

    @property
    def tile_volume(self) -> int:
        return math.prod(self.tile_size)

    @property
    def num_video_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def num_tiled_video_tokens(self) -> int:
        """Video tokens including padding: one block per tile."""
        return math.prod(self.tile_grid) * self.block_size

    @property
    def seq_len(self) -> int:
        """Length of the tiled sequence (padded video, then text)."""
        return self.num_tiled_video_tokens + self.num_text_tokens

    def to_tiles(self, x_BSHD: torch.Tensor) -> torch.Tensor:
        """`[B, S, H, D]` in grid order -> `[B, H, seq_len, D]` (a view) in tile order.

        Padding rows copy token 0: they are never attended as keys and dropped as queries,
        so any finite values do, and one gather is the only copy."""
        gather, _, _ = _tile_indices(self, x_BSHD.device)
        return x_BSHD.index_select(1, gather).transpose(1, 2)

    def from_tiles(self, out_BHLD: torch.Tensor) -> torch.Tensor:
        """Inverse of `to_tiles`, dropping the padding rows: `[B, S, H, D]` in grid order."""
        _, scatter, _ = _tile_indices(self, out_BHLD.device)
        return out_BHLD.transpose(1, 2).index_select(1, scatter)


@functools.lru_cache(maxsize=64)
def _tile_indices(layout: TileLayout, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(tiled position -> source token, source token -> tiled position, tiled position is a
    real token) for `layout`."""
    (nt, nh, nw), (tt, th, tw) = layout.tile_grid, layout.tile_size
    pad = [n * t - g for n, t, g in zip(layout.tile_grid, layout.tile_size, layout.grid)]
    pad_spec = (0, pad[2], 0, pad[1], 0, pad[0])  # F.pad lists the last dim first

    def tile_order(x_THW: torch.Tensor) -> torch.Tensor:
        return x_THW.view(nt, tt, nh, th, nw, tw).permute(0, 2, 4, 1, 3, 5).reshape(-1)

    def blocks(x_THW: torch.Tensor) -> torch.Tensor:
        # One row per tile, padded at its end to a whole block.
        tiles = tile_order(F.pad(x_THW, pad_spec)).view(-1, layout.tile_volume)
        return F.pad(tiles, (0, layout.block_size - layout.tile_volume)).reshape(-1)

    num_video, text = layout.num_video_tokens, torch.arange(layout.num_text_tokens)
    tokens = torch.arange(num_video).view(layout.grid)
    gather = torch.cat([blocks(tokens), num_video + text])
    real = torch.cat([blocks(torch.ones(layout.grid, dtype=torch.bool)),
                      torch.ones(layout.num_text_tokens, dtype=torch.bool)])
    scatter = torch.empty(num_video + layout.num_text_tokens, dtype=torch.int64)
    scatter[gather[real]] = torch.nonzero(real).flatten()
    return gather.to(device), scatter.to(device), real.to(device)


def clamp_window(window: Window, tile_grid: Grid) -> Window:
    """The window actually used on `tile_grid`: at most the whole axis."""
    return tuple(min(w, n) for w, n in zip(window, tile_grid))


def sta_mask_mod(layout: TileLayout, windows: tuple[Window, ...], device: torch.device, *,
                 video_attends_text: bool = True, text_attends_video: bool = True):
    """The exact STA mask as a FlexAttention mask_mod over positions of the tiled sequence,
    with one window per head or one for all heads."""
    windows_H3 = torch.tensor([clamp_window(w, layout.tile_grid) for w in windows],
                              dtype=torch.int32, device=device)
    real = _tile_indices(layout, device)[2]
    nt, nh, nw = layout.tile_grid
    block, num_video = layout.block_size, layout.num_tiled_video_tokens
    per_head = windows_H3.shape[0] > 1

    def tile_coords(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tile = idx // block
        return tile // (nh * nw), (tile // nw) % nh, tile % nw

    def window_start(q_tile: torch.Tensor, window: torch.Tensor, num_tiles: int) -> torch.Tensor:
        # Centred on the query tile, then shifted to lie inside [0, num_tiles).
        return torch.clamp(torch.minimum(q_tile - (window - 1) // 2, num_tiles - window), min=0)

    def mask_mod(b, h, q_idx, kv_idx):
        q_t, q_h, q_w = tile_coords(q_idx)
        k_t, k_h, k_w = tile_coords(kv_idx)
        # A single window is broadcast: the mask is built for head 0, the kernel passes any h.
        row = h if per_head else 0
        w_t, w_h, w_w = windows_H3[row, 0], windows_H3[row, 1], windows_H3[row, 2]
        s_t, s_h, s_w = (window_start(q_t, w_t, nt), window_start(q_h, w_h, nh),
                         window_start(q_w, w_w, nw))
        in_window = ((k_t >= s_t) & (k_t < s_t + w_t) & (k_h >= s_h) & (k_h < s_h + w_h)
                     & (k_w >= s_w) & (k_w < s_w + w_w))
        q_video, kv_text = q_idx < num_video, kv_idx >= num_video
        kv_real_video = ~kv_text & real[kv_idx]
        allowed = q_video & kv_real_video & in_window
        allowed = allowed | (kv_text if video_attends_text else ~q_video & kv_text)
        if text_attends_video:
            allowed = allowed | (~q_video & kv_real_video)
        return allowed

    return mask_mod


def get_sta_block_mask(layout: TileLayout, windows: tuple[Window, ...], device: torch.device,
                       *, video_attends_text: bool = True, text_attends_video: bool = True,
                       fused: bool | None = None) -> BlockMask:
    """The block mask for `layout` with one window per head (or one for all heads), built
    once per argument set and cached: same arguments, same object.

    `fused`: the mask goes to the compiled FlexAttention kernel, which never visits the blocks
    the mask leaves out, so partial blocks only need to mask padding keys (see below); the
    eager kernel applies mask_mod to every element and needs the exact one. None: on CUDA,
    where `sliding_tile_attention` always compiles.
    """
    device = torch.device(device)
    fused = device.type == "cuda" if fused is None else fused
    return _build_block_mask(layout, tuple(windows), device, video_attends_text,
                             text_attends_video, fused)


@functools.lru_cache(maxsize=256)
def _build_block_mask(layout: TileLayout, windows: tuple[Window, ...], device: torch.device,
                      video_attends_text: bool, text_attends_video: bool,
                      fused: bool) -> BlockMask:
    exact_mod = sta_mask_mod(layout, windows, device, video_attends_text=video_attends_text,
                             text_attends_video=text_attends_video)
    # On GPU compile the mask construction: eager would materialise [H, L, L] booleans.
    build = _compiled(create_block_mask) if device.type == "cuda" else create_block_mask
    exact = build(exact_mod, None, len(windows) if len(windows) > 1 else None, layout.seq_len,
                  layout.seq_len, device=device, BLOCK_SIZE=layout.block_size)
    if not fused:
        return exact
    # A block is one (query tile, key tile) pair, or text: whether the pair is in the window
    # is decided per block, so inside a partial block only padding keys are masked. The
    # kernel evaluates mask_mod on every element of a partial block: one lookup there
    # instead of the window test is 27% faster.
    real = _tile_indices(layout, device)[2]

    def padding_mask_mod(b, h, q_idx, kv_idx):
        return real[kv_idx]

    return BlockMask.from_kv_blocks(
        exact.kv_num_blocks, exact.kv_indices, exact.full_kv_num_blocks, exact.full_kv_indices,
        BLOCK_SIZE=exact.BLOCK_SIZE, mask_mod=padding_mask_mod, seq_lengths=exact.seq_lengths)


def sta_block_density(grid: Grid, tile_size: Window | str,
                      windows: Window | Sequence[Window]) -> float:
    """Fraction of (query tile, key tile) pairs of the video that STA computes, averaged over
    heads: the compute of STA relative to dense attention on the tiled grid (padding makes
    the work relative to dense attention on the real tokens larger: see `TileLayout`)."""
    tile_grid = TileLayout(grid, resolve_tile_size(tile_size, grid)).tile_grid
    per_head = [windows] if isinstance(windows[0], int) else windows
    return sum(math.prod(w / n for w, n in zip(clamp_window(parse_window(window, "window"),
                                                            tile_grid), tile_grid))
               for window in per_head) / len(per_head)


@functools.cache
def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)


# Hopper's bulk tensor copies (TMA) for the kernel's loads: 4-5% faster on an H100 at Wan
# 480p; Inductor turns it off by itself where the device or layout can't use it. q scaled
# (by the softmax scale and log2 e) once before the kernel instead of every score: another
# 5% (5.19 -> 4.96 ms at 25.7% density), for one more bf16 rounding of q (error against
# exactly masked SDPA 2.3e-3 -> 3.9e-3, far below STA's own 1.7e-2 against dense attention;
# benchmarks/RESULTS.md). Measured with torch 2.11; older releases get their defaults.
_CUDA_KERNEL_OPTIONS = ({"USE_TMA": True, "PRESCALE_QK": True} if torch.__version__ >= "2.11"
                        else {})


def _flex(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: BlockMask,
          scale: float | None) -> torch.Tensor:
    if query.device.type != "cuda":
        return flex_attention(query, key, value, block_mask=block_mask, scale=scale)
    # Eager FlexAttention materialises the scores: on GPU always the compiled kernel.
    flex = flex_attention if torch.compiler.is_compiling() else _compiled(flex_attention)
    return flex(query, key, value, block_mask=block_mask, scale=scale,
                kernel_options=_CUDA_KERNEL_OPTIONS)


def block_size_for(tile_volume: int, device: torch.device) -> int:
    """Tokens per tile in the tiled sequence: on GPU the tile's volume rounded up to whole
    kernel blocks; elsewhere the volume itself (the eager kernel masks per element)."""
    if torch.device(device).type != "cuda":
        return tile_volume
    return -(-tile_volume // KERNEL_BLOCK) * KERNEL_BLOCK


def sliding_tile_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                           grid: Grid, tile_size: Window | str,
                           windows: Window | Sequence[Window], num_text_tokens: int = 0,
                           scale: float | None = None, video_attends_text: bool = True,
                           text_attends_video: bool = True,
                           block_size: int | None = None) -> torch.Tensor:
    """STA on `[B, S, H, D]` tensors, `S = T * H' * W' + num_text_tokens` (video first, in
    grid order); `windows` is one window for all heads or one per head of the input.
    `tile_size` "auto": `choose_tile_size(grid)`; `block_size` None: `block_size_for`."""
    tile_size = resolve_tile_size(tile_size, grid)
    if block_size is None:
        block_size = block_size_for(math.prod(tile_size), query.device)
    per_head = (parse_window(windows, "window"),) if isinstance(windows[0], int) else tuple(
        parse_window(w, f"window of head {i}") for i, w in enumerate(windows))
    if len(per_head) not in (1, query.shape[2]):
        raise ValueError(f"{len(per_head)} windows for {query.shape[2]} heads")
    plan = sta_plan(query, TileLayout(grid, tile_size, num_text_tokens, block_size), per_head,
                    video_attends_text=video_attends_text, text_attends_video=text_attends_video)
    return attend_tiles(query, key, value, *plan, scale=scale)


@torch.compiler.disable
def sta_plan(query: torch.Tensor, layout: TileLayout, windows: tuple[Window, ...], *,
             video_attends_text: bool = True,
             text_attends_video: bool = True
             ) -> tuple[BlockMask, torch.Tensor, torch.Tensor, CutePadding | None]:
    """(block mask, gather index, scatter index, `CutePadding` or None) for `attend_tiles`,
    from the caches; the padding plan when STA runs on the CuTe kernel.

    Kept out of compiled graphs: it is Python-side lookups, and a compiled DiT then breaks
    its graph here once per attention call instead of guarding on the caches."""
    if query.shape[1] != layout.num_video_tokens + layout.num_text_tokens:
        raise ValueError(f"sequence length {query.shape[1]} != grid {layout.grid} "
                         f"({layout.num_video_tokens} tokens) + {layout.num_text_tokens} text "
                         "tokens")
    if query.device.type == "cuda" and layout.block_size % KERNEL_BLOCK:
        raise ValueError(f"block_size {layout.block_size} (tile_size {layout.tile_size}) is "
                         f"not a multiple of {KERNEL_BLOCK}, the GPU FlexAttention kernel's "
                         "block; leave block_size None to round the tile up")
    windows = tuple(clamp_window(w, layout.tile_grid) for w in windows)  # one cache entry each
    if len(set(windows)) == 1:
        windows = windows[:1]  # one mask broadcast over heads is cheaper to build
    block_mask = get_sta_block_mask(layout, windows, query.device,
                                    video_attends_text=video_attends_text,
                                    text_attends_video=text_attends_video)
    gather, scatter, _ = _tile_indices(layout, query.device)
    padding = None
    if use_cute_kernel(query):
        padding = (_padding_rescale(layout, windows, query.device, video_attends_text,
                                    text_attends_video)
                   if padding_mode() == "rescale" else
                   CutePadding(key_table=_key_table(layout, query.device)))
    return block_mask, gather, scatter, padding


def use_cute_kernel(query: torch.Tensor) -> bool:
    """Whether STA runs on FlashAttention's CuTe kernel for `query` (`STA_KERNEL_ENV`)."""
    choice = os.environ.get(STA_KERNEL_ENV, "auto").strip().lower() or "auto"
    if choice not in STA_KERNELS:
        raise ValueError(f"{STA_KERNEL_ENV}={choice!r}; allowed: {', '.join(STA_KERNELS)}")
    if choice == "flex":
        return False
    reason = cute_unavailable_reason(query.device, query.dtype, query.shape[-1])
    if choice == "flash_cute" and reason is not None:
        raise ValueError(f"{STA_KERNEL_ENV}=flash_cute, but FlashAttention's CuTe kernel "
                         f"cannot run here: {reason}")
    return reason is None


def padding_mode() -> str:
    """`STA_PADDING_ENV`, checked: how the CuTe kernel leaves out padding keys."""
    choice = os.environ.get(STA_PADDING_ENV, "rescale").strip().lower() or "rescale"
    if choice not in STA_PADDINGS:
        raise ValueError(f"{STA_PADDING_ENV}={choice!r}; allowed: {', '.join(STA_PADDINGS)}")
    return choice


@dataclass(frozen=True)
class CutePadding:
    """What the CuTe kernel needs about a tiled sequence's padding keys: the `key_table`
    of `_key_table` (mask mode) or, for rescale mode, the padding `rows` of the tiled
    sequence (zeroed in k and v) and `keys_per_row`, `[heads or 1, seq_len]` fp32: how many
    padding keys each query row attends (`_padding_rescale`)."""

    key_table: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    keys_per_row: torch.Tensor | None = None


@functools.lru_cache(maxsize=256)
def _padding_rescale(layout: TileLayout, windows: tuple[Window, ...], device: torch.device,
                     video_attends_text: bool, text_attends_video: bool) -> CutePadding:
    block_mask = get_sta_block_mask(layout, windows, device, video_attends_text=video_attends_text,
                                    text_attends_video=text_attends_video, fused=True)
    real = _tile_indices(layout, device)[2]
    return CutePadding(rows=torch.nonzero(~real).flatten(),
                       keys_per_row=padding_keys_per_row(block_mask, real))


def padding_keys_per_row(block_mask: BlockMask, real: torch.Tensor) -> torch.Tensor:
    """`[heads or 1, L]` fp32: the padding keys (`real` False) in the blocks each query row
    attends, partial and full blocks alike; positions past `L` are not keys."""
    length, block = real.numel(), block_mask.BLOCK_SIZE[1]
    num_blocks = -(-length // block)
    padding = F.pad(~real, (0, num_blocks * block - length)).view(num_blocks, block).sum(1)
    per_block = torch.zeros(block_mask.kv_num_blocks.shape[1:], dtype=torch.float32,
                            device=real.device)  # [H, query blocks]
    for counts, indices in ((block_mask.kv_num_blocks, block_mask.kv_indices),
                            (block_mask.full_kv_num_blocks, block_mask.full_kv_indices)):
        if counts is None:
            continue
        listed = torch.arange(indices.shape[-1], device=real.device) < counts[0, ..., None]
        per_block += (padding[indices[0].clamp(max=num_blocks - 1)] * listed).sum(-1).float()
    return per_block.repeat_interleave(block_mask.BLOCK_SIZE[0], dim=1)[:, :length].contiguous()


def select_rows(x_BLHD: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`x.index_select(1, index)` for `[B, L, ...]`, as one gather of whole rows.

    PyTorch gathers along dim 1 of a batch above 1 with a generic element-wise kernel; a
    guidance pair's sparse forward spent 47 ms a step in it on an H200, against ~14 ms for
    the same rows gathered as rows of the flattened batch (benchmarks/RESULTS.md)."""
    batch, length = x_BLHD.shape[:2]
    if batch == 1:
        return x_BLHD.index_select(1, index)
    rows = x_BLHD.reshape(batch * length, *x_BLHD.shape[2:])
    return rows.index_select(0, _batch_rows(index, batch, length)).view(
        batch, index.numel(), *x_BLHD.shape[2:])


_BATCH_ROWS: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}


def _batch_rows(index: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """`index` into each of `batch` rows of `length`, flattened; kept per index tensor
    (the plans' indices live in caches, so each is built once)."""
    key = (id(index), batch, length)
    entry = _BATCH_ROWS.get(key)
    if entry is None or entry[0] is not index:  # the id of a freed tensor, reused
        if len(_BATCH_ROWS) >= 256:
            _BATCH_ROWS.clear()
        offsets = torch.arange(batch, device=index.device, dtype=index.dtype)[:, None] * length
        entry = _BATCH_ROWS[key] = (index, (index[None] + offsets).flatten())
    return entry[1]


def unpad_softmax_rows(out_BLHD: torch.Tensor, lse_BHL: torch.Tensor,
                       keys_per_row: torch.Tensor, scatter: torch.Tensor) -> torch.Tensor:
    """Rows `scatter` of an attention output whose rows also attended `keys_per_row` zero
    keys with zero values (each adding exp(0) to the softmax's sum S = exp(lse), nothing to
    the output), as if they had not: out * S / (S - n), in `[B, S, H, D]` grid order.

    On GPU one compiled kernel instead of a gather and a slow broadcast product: a whole
    STA call at Wan 480p on an H200 went from 3.68 to 3.49 ms (benchmarks/RESULTS.md)."""
    unpad = _compiled(_unpad_rows) if out_BLHD.is_cuda else _unpad_rows
    return unpad(out_BLHD, lse_BHL, keys_per_row, scatter)


def _unpad_rows(out_BLHD: torch.Tensor, lse_BHL: torch.Tensor, keys_per_row: torch.Tensor,
                scatter: torch.Tensor) -> torch.Tensor:
    lse = lse_BHL.index_select(2, scatter)
    keys = keys_per_row.index_select(1, scatter)
    real_mass = (1.0 - keys * torch.exp(-lse)).clamp_min(_MIN_REAL_MASS)  # (S - n) / S
    rows = out_BLHD.index_select(1, scatter)
    # out * S / (S - n) as out + out * delta, delta = n / (S - n) (~0.01): delta in the
    # output's dtype loses nothing that matters (bf16 rounds it by 0.4% of itself, not of
    # the factor), and a pass in one dtype avoids PyTorch's slow mixed-dtype kernel (a
    # bf16 * fp32 product took 7.9 ms of a 257 ms STA forward on an H200).
    delta = ((1.0 - real_mass) / real_mass).transpose(1, 2).unsqueeze(-1).to(rows.dtype)
    return rows.addcmul_(rows, delta)


@functools.lru_cache(maxsize=64)
def _key_table(layout: TileLayout, device: torch.device) -> torch.Tensor:
    """int32 per position of the tiled sequence, 1 for a real key; one block of zeros past
    the end, which the CuTe kernel's last partial block may read."""
    real = _tile_indices(layout, device)[2]
    table = torch.zeros(layout.seq_len + layout.block_size, dtype=torch.int32, device=device)
    table[:layout.seq_len] = real.int()
    return table


def attend_tiles(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 block_mask: BlockMask, gather: torch.Tensor, scatter: torch.Tensor,
                 padding: CutePadding | None = None, *,
                 scale: float | None = None) -> torch.Tensor:
    """Gather `[B, S, H, D]` into tile order, attend with `block_mask`, scatter back.

    `padding`: run FlashAttention's CuTe kernel, which masks the padding keys by its
    `key_table` or attends them zeroed and rescales (`STA_PADDINGS`); None: FlexAttention."""
    if padding is not None:
        tiled = [select_rows(x, gather) for x in (query, key, value)]  # [B, L, H, D]
        blocks = (block_mask.kv_num_blocks, block_mask.kv_indices,
                  block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
        scale = scale or query.shape[-1] ** -0.5
        if padding.key_table is not None:
            out = flash_cute_block_sparse_attention(*tiled, *blocks, padding.key_table,
                                                    block_mask.BLOCK_SIZE[1], scale)
            return select_rows(out, scatter)
        for x in tiled[1:]:
            x.index_fill_(1, padding.rows, 0)  # padding keys: score 0, value 0
        out, lse = flash_cute_block_sparse_unmasked(*tiled, *blocks, block_mask.BLOCK_SIZE[1],
                                                    scale)
        return unpad_softmax_rows(out, lse, padding.keys_per_row, scatter)
    tiled = [x.index_select(1, gather).transpose(1, 2) for x in (query, key, value)]
    return _flex(*tiled, block_mask, scale).transpose(1, 2).index_select(1, scatter)


class SlidingTileAttentionImpl(AttentionImpl):
    """STA with the windows of this layer (`layer_idx`) at the step, grid and text length
    of `metadata`.

    Steps and layers whose heads are all dense run dense attention on the unreordered
    tokens (FlashAttention's CuTe kernel where it runs, else SDPA).

    Inside a compiled block (inference) the whole of it is one custom op
    (`fastvideo::sliding_tile_attention`) that reads the step and looks up its plan when it
    runs: the block compiles to one graph for dense and sparse steps alike, with no graph
    break at the attention and no recompile from step to step.
    """

    uses_metadata = True

    def __init__(self, num_heads: int, head_size: int, softmax_scale: float | None = None,
                 causal: bool = False, *, layer_idx: int | None = None) -> None:
        if causal:
            raise ValueError("SLIDING_TILE_ATTN is bidirectional; causal=True is not supported")
        super().__init__(num_heads, head_size, softmax_scale, causal)
        self.layer_idx = layer_idx
        # A tensor, not an int, in the op's call: an int read in a compiled block becomes a
        # guard, and every block (one shared graph) would recompile for its own index.
        self._layer_tensor = torch.tensor([-1 if layer_idx is None else layer_idx], device="cpu")

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                metadata: AttentionMetadata | None = None) -> torch.Tensor:
        """`metadata.head_offset`: global index of `query`'s head 0."""
        if torch.compiler.is_compiling() and metadata is not None and not (
                query.requires_grad or key.requires_grad or value.requires_grad):
            grid = list(metadata.grid) if metadata.grid is not None else []
            return sliding_tile_attention_op(
                query, key, value, self._layer_tensor, metadata.step_tensor, metadata.sta_key,
                grid, metadata.num_text_tokens, metadata.head_offset, self.num_heads,
                self.softmax_scale)
        return self._forward_eager(query, key, value, metadata)

    @torch.compiler.disable  # reads the step: traced, a compiled block would guard on it
    def _forward_eager(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       metadata: AttentionMetadata | None) -> torch.Tensor:
        if metadata is None:
            _missing_metadata()
        return _sta_attend(query, key, value, metadata.sta_config, metadata.step,
                           self.layer_idx, metadata.grid, metadata.num_text_tokens,
                           metadata.head_offset, self.num_heads, self.softmax_scale)


def _missing_metadata() -> NoReturn:
    raise ValueError("SLIDING_TILE_ATTN needs an STAConfig and the latent grid: pass the DiT "
                     "attn_metadata=AttentionMetadata(sta_config=..., step=...) (the DiT fills "
                     "in the grid)")


def _sta_attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                config: STAConfig | None, step: int, layer_idx: int | None,
                grid: Grid | None, num_text_tokens: int, head_offset: int, num_heads: int,
                softmax_scale: float | None) -> torch.Tensor:
    """One STA layer's attention at `step`: dense where all its local heads are."""
    if config is None or grid is None:
        _missing_metadata()
    windows = config.head_windows(step, layer_idx, num_heads)
    local = None if windows is None else windows[head_offset:head_offset + query.shape[2]]
    if local is None or all(w is None for w in local):
        if cute_unavailable_reason(query.device, query.dtype, query.shape[-1]) is None:
            return flash_cute_attention(query, key, value,
                                        softmax_scale or query.shape[-1] ** -0.5, False)
        out = F.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
            scale=softmax_scale)
        return out.transpose(1, 2)
    tile_size = config.tile_for(grid)
    layout = TileLayout(grid, tile_size, num_text_tokens,
                        block_size_for(math.prod(tile_size), query.device))
    plan = sta_plan(query, layout, tuple(layout.tile_grid if w is None else w for w in local),
                    video_attends_text=config.video_attends_text,
                    text_attends_video=config.text_attends_video)
    return attend_tiles(query, key, value, *plan, scale=softmax_scale)


@torch.library.custom_op("fastvideo::sliding_tile_attention", mutates_args=())
def sliding_tile_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              layer: torch.Tensor, step: torch.Tensor, config_key: int,
                              grid: list[int], num_text_tokens: int, head_offset: int,
                              num_heads: int, softmax_scale: float | None) -> torch.Tensor:
    """`SlidingTileAttentionImpl` as one op, for compiled blocks: `layer` and `step` are
    one-element CPU tensors, `config_key` an `AttentionMetadata.sta_key`."""
    layer_idx = int(layer[0])
    out = _sta_attend(query, key, value, sta_config_for_key(config_key), int(step[0]),
                      None if layer_idx < 0 else layer_idx, tuple(grid) if grid else None,
                      num_text_tokens, head_offset, num_heads, softmax_scale)
    return out.contiguous()


@sliding_tile_attention_op.register_fake
def _(query, key, value, layer, step, config_key, grid, num_text_tokens, head_offset,
      num_heads, softmax_scale):
    return query.new_empty(*query.shape[:-1], value.shape[-1])


BACKEND = AttentionBackend(
    name=_Backend.SLIDING_TILE_ATTN,
    impl_cls=SlidingTileAttentionImpl,
    dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16}),
    device_types=frozenset({"cpu", "cuda"}),
)
