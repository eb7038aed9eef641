"""Sliding Tile Attention against dense attention with a mask built here from the definition.

fp32 on CPU with eager FlexAttention, which equals SDPA with the same boolean mask to ~3e-7
(NOTES.md); 1e-5 leaves room for summation order over a few hundred keys.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from fastvideo.attention.backends import sliding_tile
from fastvideo.attention.backends.sliding_tile import (
    BACKEND,
    SlidingTileAttentionImpl,
    TileLayout,
    block_size_for,
    get_sta_block_mask,
    sliding_tile_attention,
    sta_block_density,
)
from fastvideo.attention.metadata import AttentionMetadata
from fastvideo.attention.sta_config import STAConfig, choose_tile_size

ATOL = 1e-5
# CPU runs FlexAttention eagerly on purpose (compiling costs ~17 s per shape here).
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _window_tiles(q_tile: int, window: int, num_tiles: int) -> set[int]:
    """The `window` consecutive tiles (at most all) containing `q_tile`, inside the grid,
    centred on it as nearly as the borders allow; an even window reaches one more tile on
    the right."""
    size = min(window, num_tiles)
    starts = [s for s in range(num_tiles - size + 1) if s <= q_tile < s + size]
    best = min(starts, key=lambda s: (abs(s + (size - 1) / 2 - q_tile), -s))
    return set(range(best, best + size))


def reference_mask(grid, tile_size, windows, num_text=0, video_attends_text=True,
                   text_attends_video=True) -> torch.Tensor:
    """`[H, S, S]` booleans in the input's token order (video row-major, then text)."""
    positions = list(itertools.product(*(range(n) for n in grid)))
    num_video = len(positions)
    size = num_video + num_text
    tile_grid = [math.ceil(n / t) for n, t in zip(grid, tile_size)]
    masks = torch.zeros(len(windows), size, size, dtype=torch.bool)
    for head, window in enumerate(windows):
        for qi, q_pos in enumerate(positions):
            allowed = [_window_tiles(p // t, w, n)
                       for p, t, w, n in zip(q_pos, tile_size, window, tile_grid)]
            for ki, k_pos in enumerate(positions):
                masks[head, qi, ki] = all(p // t in a for p, t, a in zip(k_pos, tile_size, allowed))
        masks[head, num_video:, num_video:] = True
        masks[head, :num_video, num_video:] = video_attends_text
        masks[head, num_video:, :num_video] = text_attends_video
    return masks


def _qkv(seq_len: int, num_heads: int, dim: int = 8, batch: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, seq_len, num_heads, dim, generator=generator) for _ in range(3)]


def _sdpa(q, k, v, mask=None, scale=None):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


@pytest.mark.parametrize("grid, tile_size", [((4, 6, 8), (2, 3, 4)), ((5, 7, 6), (2, 4, 4))],
                         ids=["whole-tiles", "padded"])
@pytest.mark.parametrize("num_text", [0, 5])
def test_window_covering_the_grid_is_dense_attention(grid, tile_size, num_text) -> None:
    q, k, v = _qkv(math.prod(grid) + num_text, num_heads=3)
    # (9, 9, 9) tiles exceed every axis: clamped to the whole grid.
    out = sliding_tile_attention(q, k, v, grid=grid, tile_size=tile_size, windows=(9, 9, 9),
                                 num_text_tokens=num_text)
    torch.testing.assert_close(out, _sdpa(q, k, v), atol=ATOL, rtol=0)


@pytest.mark.parametrize("grid, tile_size", [((4, 6, 8), (2, 3, 4)), ((5, 7, 6), (2, 4, 4))],
                         ids=["whole-tiles", "padded"])
@pytest.mark.parametrize("window", [(1, 1, 1), (2, 3, 1), (3, 1, 2)])
@pytest.mark.parametrize("block_pad", [0, 5], ids=["block=tile", "block>tile"])
def test_small_window_matches_reference_mask(grid, tile_size, window, block_pad) -> None:
    """Also with each tile padded to a larger block, as on GPU for tiles under 128 tokens."""
    q, k, v = _qkv(math.prod(grid), num_heads=2)
    out = sliding_tile_attention(q, k, v, grid=grid, tile_size=tile_size, windows=window,
                                 block_size=math.prod(tile_size) + block_pad)
    expected = _sdpa(q, k, v, reference_mask(grid, tile_size, [window])[None])
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("video_attends_text, text_attends_video",
                         [(True, True), (False, True), (True, False), (False, False)])
def test_text_tokens(video_attends_text: bool, text_attends_video: bool) -> None:
    grid, tile_size, num_text = (3, 5, 6), (2, 2, 4), 7
    windows = [(1, 3, 1), (2, 1, 1)]
    q, k, v = _qkv(math.prod(grid) + num_text, num_heads=2)
    out = sliding_tile_attention(q, k, v, grid=grid, tile_size=tile_size, windows=windows,
                                 num_text_tokens=num_text, scale=0.3,
                                 video_attends_text=video_attends_text,
                                 text_attends_video=text_attends_video)
    mask = reference_mask(grid, tile_size, windows, num_text, video_attends_text,
                          text_attends_video)
    torch.testing.assert_close(out, _sdpa(q, k, v, mask[None], scale=0.3), atol=ATOL, rtol=0)


def test_per_head_windows_with_head_offset_through_the_backend() -> None:
    """4 global heads with their own windows; this process holds heads 2 and 3."""
    grid, tile_size, num_text = (5, 6, 7), (2, 4, 4), 3
    windows = [(1, 1, 1), (3, 3, 3), (1, 2, 1), None]  # None: head 3 dense
    config = STAConfig(tile_size=tile_size, windows={4: [windows]})
    q, k, v = _qkv(math.prod(grid) + num_text, num_heads=2)
    impl = BACKEND.impl_cls(4, 8, layer_idx=0)
    metadata = AttentionMetadata(sta_config=config, step=4, grid=grid,
                                 num_text_tokens=num_text, head_offset=2)
    out = impl.forward(q, k, v, metadata)
    mask = reference_mask(grid, tile_size, [(1, 2, 1), (9, 9, 9)], num_text)
    torch.testing.assert_close(out, _sdpa(q, k, v, mask[None]), atol=ATOL, rtol=0)


def test_head_offset_defaults_to_the_first_head() -> None:
    grid, tile_size = (3, 4, 4), (1, 2, 2)
    windows = [(1, 1, 1), (3, 1, 1), (1, 1, 3), (2, 2, 2)]
    config = STAConfig(tile_size=tile_size, windows={0: [windows]})
    q, k, v = _qkv(math.prod(grid), num_heads=2)
    out = SlidingTileAttentionImpl(4, 8, layer_idx=0).forward(
        q, k, v, AttentionMetadata(sta_config=config, grid=grid))
    mask = reference_mask(grid, tile_size, windows[:2])
    torch.testing.assert_close(out, _sdpa(q, k, v, mask[None]), atol=ATOL, rtol=0)


def test_dense_steps_and_missing_context() -> None:
    grid = (2, 4, 4)
    q, k, v = _qkv(math.prod(grid), num_heads=2)
    impl = SlidingTileAttentionImpl(2, 8)
    config = STAConfig(tile_size=(1, 2, 2), num_full_steps=3, default_window=(1, 1, 1))
    at_step = {step: AttentionMetadata(sta_config=config, grid=grid, step=step)
               for step in (2, 3)}
    torch.testing.assert_close(impl.forward(q, k, v, at_step[2]), _sdpa(q, k, v), atol=ATOL,
                               rtol=0)
    sparse = impl.forward(q, k, v, at_step[3])
    mask = reference_mask(grid, (1, 2, 2), [(1, 1, 1)])
    torch.testing.assert_close(sparse, _sdpa(q, k, v, mask[None]), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="needs an STAConfig and the latent grid"):
        impl.forward(q, k, v)
    with pytest.raises(ValueError, match="needs an STAConfig and the latent grid"):
        impl.forward(q, k, v, AttentionMetadata(grid=grid))
    with pytest.raises(ValueError, match="causal"):
        SlidingTileAttentionImpl(2, 8, causal=True)
    with pytest.raises(ValueError, match=r"sequence length 32 != grid \(2, 4, 5\)"):
        impl.forward(q, k, v, AttentionMetadata(sta_config=config, grid=(2, 4, 5), step=3))


def _mask_of_fused_kernel(block_mask, layout: TileLayout) -> torch.Tensor:
    """`[H, L, L]`: what the compiled kernel applies: full blocks, and mask_mod inside the
    partial blocks; every other block is skipped."""
    vol, size = layout.block_size, layout.seq_len

    def expand(num_blocks, indices) -> torch.Tensor:
        blocks = BlockMask.from_kv_blocks(num_blocks, indices, BLOCK_SIZE=vol).to_dense()[0]
        return blocks.repeat_interleave(vol, 1).repeat_interleave(vol, 2)[:, :size, :size]

    index, zero = torch.arange(size), torch.zeros((), dtype=torch.int64)
    elementwise = block_mask.mask_mod(zero, zero, index[:, None], index[None, :])
    return (expand(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
            | expand(block_mask.kv_num_blocks, block_mask.kv_indices) & elementwise)


@pytest.mark.parametrize("windows, video_attends_text", [([(1, 2, 1), (3, 1, 2)], True),
                                                         ([(2, 1, 1)], False)])
@pytest.mark.parametrize("block_size", [None, 40], ids=["block=tile", "block>tile"])
def test_fused_kernel_mask_matches_reference(windows, video_attends_text: bool,
                                             block_size: int | None) -> None:
    """On GPU partial blocks mask padding only (the kernel skips the blocks outside the
    windows): check the mask this amounts to, as the CPU's eager kernel cannot."""
    layout = TileLayout((5, 6, 7), (2, 4, 4), 3, block_size)
    block_mask = get_sta_block_mask(layout, tuple(windows), torch.device("cpu"), fused=True,
                                    video_attends_text=video_attends_text)
    tiled = _mask_of_fused_kernel(block_mask, layout)
    # Tiled position of each token in input order, to read the mask in input order.
    position = layout.from_tiles(torch.arange(layout.seq_len).view(1, 1, -1, 1)).flatten()
    expected = reference_mask(layout.grid, layout.tile_size, windows, 3, video_attends_text)
    assert torch.equal(tiled[:, position][:, :, position], expected)
    padding = torch.ones(layout.seq_len, dtype=torch.bool)
    padding[position] = False
    assert padding.sum() == layout.seq_len - layout.num_video_tokens - 3
    assert not tiled[:, :, padding].any()  # no query attends a padding key


def test_block_mask_is_built_once_per_shape_and_window() -> None:
    layout = TileLayout((3, 5, 6), (2, 2, 4), 2)
    device = torch.device("cpu")
    first = get_sta_block_mask(layout, ((1, 3, 1),), device)
    assert get_sta_block_mask(TileLayout((3, 5, 6), (2, 2, 4), 2), ((1, 3, 1),), device) is first
    assert get_sta_block_mask(layout, ((3, 3, 1),), device) is not first
    assert get_sta_block_mask(TileLayout((3, 5, 7), (2, 2, 4), 2), ((1, 3, 1),), device) is not first

    q, k, v = _qkv(layout.num_video_tokens + 2, num_heads=2)
    before = sliding_tile._build_block_mask.cache_info()
    for _ in range(3):  # per-head windows that are all equal share the broadcast mask
        sliding_tile_attention(q, k, v, grid=layout.grid, tile_size=layout.tile_size,
                               windows=[(1, 3, 1)] * 2, num_text_tokens=2)
    after = sliding_tile._build_block_mask.cache_info()
    assert (after.hits - before.hits, after.misses - before.misses) == (3, 0)


def test_block_density() -> None:
    # Wan 480p: grid (21, 30, 52), tiles (2, 8, 8) -> 11 x 4 x 7 tiles.
    wan = (21, 30, 52)
    assert sta_block_density(wan, (2, 8, 8), (99, 99, 99)) == 1.0
    assert sta_block_density(wan, (2, 8, 8), (1, 1, 1)) == pytest.approx(1 / (11 * 4 * 7))
    assert sta_block_density(wan, (2, 8, 8), (5, 3, 5)) == pytest.approx(5 / 11 * 3 / 4 * 5 / 7)
    assert sta_block_density(wan, (2, 8, 8), [(1, 4, 7), (11, 4, 7)]) == pytest.approx(
        (1 / 11 + 1) / 2)
    # On whole tiles without text every block is a tile pair: it equals the block mask's.
    layout = TileLayout((4, 6, 8), (2, 3, 4))
    windows = ((1, 2, 1), (2, 1, 2))
    mask = get_sta_block_mask(layout, windows, torch.device("cpu"))
    assert 1 - mask.sparsity() / 100 == pytest.approx(
        sta_block_density(layout.grid, layout.tile_size, windows))


def test_auto_tile_through_the_backend() -> None:
    """STAConfig's "auto" tile is `choose_tile_size(grid)`, here (1, 2, 2) with 5 x 4 x 4
    tiles; on GPU each 4-token tile would fill a 128-token block, on CPU it fills 4."""
    grid, window = (5, 8, 8), (2, 1, 3)
    assert choose_tile_size(grid) == (1, 2, 2)
    q, k, v = _qkv(math.prod(grid), num_heads=2)
    out = SlidingTileAttentionImpl(2, 8, layer_idx=0).forward(
        q, k, v, AttentionMetadata(sta_config=STAConfig(default_window=window), grid=grid))
    mask = reference_mask(grid, (1, 2, 2), [window])
    torch.testing.assert_close(out, _sdpa(q, k, v, mask[None]), atol=ATOL, rtol=0)
    assert block_size_for(4, torch.device("cpu")) == 4
    assert block_size_for(4, torch.device("cuda")) == 128
    assert block_size_for(130, torch.device("cuda")) == 256


def test_blocks_padded_past_the_tile() -> None:
    layout = TileLayout((3, 5, 7), (2, 2, 4), 2, block_size=20)
    assert layout.seq_len == 2 * 3 * 2 * 20 + 2
    x = torch.randn(1, layout.num_video_tokens + 2, 2, 4)
    tiled = layout.to_tiles(x)
    torch.testing.assert_close(layout.from_tiles(tiled), x, atol=0, rtol=0)
    # Tile 1 starts at block 1: token (0, 0, 4) is its first position.
    torch.testing.assert_close(tiled[:, :, 20], x[:, 4])
    with pytest.raises(ValueError, match="block_size 15 is smaller than tile_size"):
        TileLayout((3, 5, 7), (2, 2, 4), block_size=15)


def test_tile_layout_round_trip_and_bad_shapes() -> None:
    layout = TileLayout((3, 5, 7), (2, 2, 4), 4)
    assert layout.tile_grid == (2, 3, 2) and layout.seq_len == 2 * 3 * 2 * 16 + 4
    x = torch.randn(2, layout.num_video_tokens + 4, 3, 5)
    tiled = layout.to_tiles(x)
    assert tiled.shape == (2, 3, layout.seq_len, 5)
    torch.testing.assert_close(layout.from_tiles(tiled), x, atol=0, rtol=0)
    # Token (t, h, w) = (0, 0, 1) sits second in tile 0; (0, 1, 0) fifth (tiles are 2 x 2 x 4).
    torch.testing.assert_close(tiled[:, :, 1], x[:, 1])
    torch.testing.assert_close(tiled[:, :, 4], x[:, 7])
    with pytest.raises(ValueError, match="grid must be three positive ints"):
        TileLayout((3, 0, 7), (2, 2, 4))
    with pytest.raises(ValueError, match="2 windows for 3 heads"):
        sliding_tile_attention(x, x, x, grid=(3, 5, 7), tile_size=(2, 2, 4),
                               windows=[(1, 1, 1), (2, 2, 2)], num_text_tokens=4)


def test_key_table_of_the_cute_kernel_matches_the_fused_mask() -> None:
    """FlashAttention's CuTe kernel reads padding keys from `_key_table` where FlexAttention
    calls the fused mask's mask_mod: same keys, and a block of zeros past the end."""
    layout = TileLayout((5, 6, 7), (2, 4, 4), 3, 40)
    block_mask = get_sta_block_mask(layout, ((1, 2, 1),), torch.device("cpu"), fused=True)
    index, zero = torch.arange(layout.seq_len), torch.zeros((), dtype=torch.int64)
    table = sliding_tile._key_table(layout, torch.device("cpu"))
    assert table.dtype == torch.int32 and table.shape == (layout.seq_len + 40,)
    assert torch.equal(table[:layout.seq_len].bool(), block_mask.mask_mod(zero, zero, zero, index))
    assert not table[layout.seq_len:].any()
    assert table.sum() == layout.num_video_tokens + 3


def test_sta_kernel_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    q = torch.zeros(1, 4, 2, 8)
    monkeypatch.delenv(sliding_tile.STA_KERNEL_ENV, raising=False)
    assert not sliding_tile.use_cute_kernel(q)  # auto: FlexAttention off CUDA
    monkeypatch.setenv(sliding_tile.STA_KERNEL_ENV, "flex")
    assert not sliding_tile.use_cute_kernel(q)
    monkeypatch.setenv(sliding_tile.STA_KERNEL_ENV, "flash_cute")
    with pytest.raises(ValueError, match="flash_cute, but .* cannot run here: needs a CUDA"):
        sliding_tile.use_cute_kernel(q)
    monkeypatch.setenv(sliding_tile.STA_KERNEL_ENV, "triton")
    with pytest.raises(ValueError, match="'triton'; allowed: auto, flex, flash_cute"):
        sliding_tile.use_cute_kernel(q)
    # The plan carries no key table off the CuTe kernel, so attend_tiles runs FlexAttention.
    monkeypatch.setenv(sliding_tile.STA_KERNEL_ENV, "auto")
    layout = TileLayout((2, 3, 4), (1, 3, 2))
    q = torch.zeros(1, layout.num_video_tokens, 2, 8)
    assert sliding_tile.sta_plan(q, layout, ((1, 1, 1),))[3] is None


def _unmasked_kernel(q, k, v, block_mask: BlockMask, scale: float):
    """What FlashAttention's CuTe kernel computes with no mask_mod, in fp64: every key of
    each listed block (partial or full) but none past the sequence; `[B, L, H, D]` in,
    (out, natural-log lse `[B, H, L]`) out."""
    length, (q_block, kv_block) = q.shape[1], block_mask.BLOCK_SIZE
    dense = block_mask.to_dense()[0].bool()  # [H, query blocks, key blocks]
    rows = torch.arange(length) // q_block
    cols = torch.arange(length) // kv_block
    allowed = dense[:, rows][:, :, cols]  # [H, L, L]
    scores = torch.einsum("blhd,bkhd->bhlk", q, k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhlk,bkhd->blhd", torch.softmax(scores, dim=-1), v)
    return out, lse


@pytest.mark.parametrize("windows, num_text", [(((1, 2, 1),), 0), (((1, 2, 1), (2, 1, 2)), 3)],
                         ids=["one-window", "per-head-with-text"])
def test_rescaled_padding_keys_equal_masked_attention(windows, num_text: int) -> None:
    """The CuTe kernel's rescale mode: padding keys zeroed and attended unmasked (each adds
    exp(0) to a row's softmax sum), then every row scaled by S / (S - n). With the kernel
    computed here exactly, the result is STA with the padding masked, and the count of
    padding keys per row is the brute-force one."""
    grid, tile, heads = (5, 6, 7), (2, 4, 4), 2
    layout = TileLayout(grid, tile, num_text, 40)  # 32-position tiles in 40-token blocks
    cpu = torch.device("cpu")
    block_mask = get_sta_block_mask(layout, windows, cpu, fused=True)
    gather, scatter, real = sliding_tile._tile_indices(layout, cpu)
    plan = sliding_tile._padding_rescale(layout, windows, cpu, True, True)
    assert torch.equal(plan.rows, torch.nonzero(~real).flatten())

    dense = block_mask.to_dense()[0].bool()
    index = torch.arange(layout.seq_len)
    allowed = dense[:, index // 40][:, :, index // 40]
    expected_counts = (allowed & ~real).sum(-1).float()
    assert plan.keys_per_row.shape == (len(windows), layout.seq_len)
    assert torch.equal(plan.keys_per_row, expected_counts)
    assert plan.keys_per_row.max() > 0

    q, k, v = (x.double() for x in _qkv(layout.num_video_tokens + num_text, heads, dim=8))
    scale = 8 ** -0.5
    tiled = [x.index_select(1, gather) for x in (q, k, v)]
    for x in tiled[1:]:
        x.index_fill_(1, plan.rows, 0)
    out, lse = _unmasked_kernel(*tiled, block_mask, scale)
    got = sliding_tile.unpad_softmax_rows(out, lse, plan.keys_per_row, scatter)

    per_head = windows if len(windows) == heads else windows * heads
    mask = reference_mask(grid, tile, per_head, num_text)
    want = _sdpa(q, k, v, mask[None], scale)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    # Without the rescale the padding keys would shift every attended row's weights.
    assert (out.index_select(1, scatter) - want).abs().max() > 1e-3


def test_sta_padding_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(sliding_tile.STA_PADDING_ENV, raising=False)
    assert sliding_tile.padding_mode() == "rescale"
    monkeypatch.setenv(sliding_tile.STA_PADDING_ENV, "MASK")
    assert sliding_tile.padding_mode() == "mask"
    monkeypatch.setenv(sliding_tile.STA_PADDING_ENV, "zero")
    with pytest.raises(ValueError, match="FASTVIDEO_STA_PADDING='zero'; allowed: rescale, mask"):
        sliding_tile.padding_mode()


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_select_rows_equals_index_select(batch: int) -> None:
    """The row gather of the flattened batch (PyTorch's gather along dim 1 of a batch above
    1 is a slow generic kernel on GPU) picks exactly what `index_select(1, ...)` picks, the
    batch's flat index built once per index tensor."""
    x = torch.randn(batch, 50, 3, 4)
    index = torch.tensor([7, 0, 49, 7, 12, 3])
    got = sliding_tile.select_rows(x, index)
    assert got.shape == (batch, 6, 3, 4)
    assert torch.equal(got, x.index_select(1, index))
    if batch > 1:
        assert sliding_tile._batch_rows(index, batch, 50) is sliding_tile._batch_rows(
            index, batch, 50)
        assert not torch.equal(got[1], x[0].index_select(0, index))  # rows of their own item
