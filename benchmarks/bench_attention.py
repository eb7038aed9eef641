"""The attention kernel alone at Wan2.1-1.3B 480p shapes: PyTorch SDPA kernels, dense
FlexAttention and Sliding Tile Attention (STA), in one process.

    python benchmarks/bench_attention.py --json-out attention.json     # GPU, 12 x 32760 x 128
    python benchmarks/bench_attention.py --smoke                       # CPU smoke test

Dense rows report TFLOP/s (4 * B * H * S^2 * D FLOPs). STA rows report effective TFLOP/s: the
dense FLOPs over STA's time, i.e. its speed-up expressed as throughput. `sta` times the whole
call (reorder into tiles, kernel, reorder back); `sta_kernel` the FlexAttention call alone on
tensors already in tile order. Errors are relative L2 against fp32 dense attention; STA's is
large by construction (it skips most pairs), so its kernel is also checked against SDPA with
the STA mask made explicit, on a few query tiles (`masked_sdpa_rel_err`).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from bench_dit import parse_tile, time_once  # the script's folder is on sys.path
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention

from fastvideo.attention.backends.flash_cute import (
    cute_unavailable_reason,
    flash_cute_attention,
    flash_cute_block_sparse_attention,
    flash_cute_block_sparse_unmasked,
)
from fastvideo.attention.backends.sliding_tile import (
    TileLayout,
    _key_table,
    _padding_rescale,
    block_size_for,
    get_sta_block_mask,
    sliding_tile_attention,
    sta_block_density,
    sta_mask_mod,
    unpad_softmax_rows,
)
from fastvideo.attention.sta_config import Window, resolve_tile_size
from fastvideo.fastvideo_args import parse_dtype

SDPA_KERNELS = {"sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_flash": SDPBackend.FLASH_ATTENTION,
                "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}


def _window(text: str) -> Window:
    return tuple(int(v) for v in text.split(","))


def _window_2(text: str) -> tuple[int, int]:
    m, n = (int(v) for v in text.split(","))
    return m, n


def _cute_tiles(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                tile_mn: tuple[int, int] | None) -> torch.Tensor:
    from flash_attn.cute.interface import _flash_attn_fwd
    return _flash_attn_fwd(q, k, v, softmax_scale=scale, tile_mn=tile_mn)[0]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", type=int, nargs=3, default=[21, 30, 52],
                        help="latent token grid T H W (Wan 480p, 81 frames: 21 30 52)")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tile-size", type=parse_tile, default=(2, 8, 8),
                        help="t,h,w or auto (choose_tile_size: (3, 6, 7) at 480p)")
    parser.add_argument("--windows", type=_window, nargs="+", default=[(5, 3, 5), (3, 3, 4)],
                        help="STA windows in tiles; defaults give 24%% and 12%% of the tile "
                             "pairs of 480p with (2, 8, 8) tiles")
    parser.add_argument("--kernel-options", type=json.loads, nargs="*", default=[],
                        help="FlexAttention kernel_options dicts (JSON) to also time the STA "
                             "kernel with, e.g. '{\"USE_TMA\": true}'")
    parser.add_argument("--cross-kv-len", type=int, default=512,
                        help="keys of the cross-attention rows (Wan's text length); 0: none")
    parser.add_argument("--cute-tiles", type=_window_2, nargs="*", default=[],
                        help="also time the dense CuTe kernel with these (tile_m, tile_n)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true",
                        help="eager FlexAttention (materialises the scores: small shapes only)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny fp32 shapes on CPU, eager: checks the script runs")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    args.tile_size = resolve_tile_size(args.tile_size, tuple(args.grid))
    if args.smoke:
        args.grid, args.heads, args.head_dim, args.dtype = [4, 6, 10], 2, 16, "fp32"
        args.device, args.tile_size, args.windows = "cpu", (2, 2, 4), [(1, 2, 2), (1, 1, 1)]
        args.iters, args.warmup, args.no_compile = 2, 1, True
    return args


def time_ms(fn: Callable[[], Any], device: torch.device, iters: int, warmup: int) -> float:
    """Median milliseconds of one call (CUDA events on GPU, wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    return statistics.median(time_once(fn, device) for _ in range(iters))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def masked_sdpa_error(layout: TileLayout, window: Window, q_BHLD: torch.Tensor,
                      k_BHLD: torch.Tensor, v_BHLD: torch.Tensor, out_BHLD: torch.Tensor) -> float:
    """STA kernel output on the first and last two query tiles against SDPA with the mask
    made explicit from the exact STA mask_mod."""
    mask_mod = sta_mask_mod(layout, (window,), q_BHLD.device)
    vol, num_tiles = layout.block_size, math.prod(layout.tile_grid)
    rows = torch.cat([torch.arange(2 * vol), torch.arange((num_tiles - 2) * vol, num_tiles * vol)])
    rows = rows.to(q_BHLD.device)
    kv = torch.arange(layout.seq_len, device=q_BHLD.device)
    zero = torch.zeros((), dtype=torch.int64, device=q_BHLD.device)
    mask = mask_mod(zero, zero, rows[:, None], kv[None, :])
    expected = F.scaled_dot_product_attention(
        q_BHLD[:, :, rows].float(), k_BHLD.float(), v_BHLD.float(), attn_mask=mask)
    return rel_err(out_BHLD[:, :, rows], expected)


def main() -> None:
    args = parse_args()
    device, dtype = torch.device(args.device), parse_dtype(args.dtype)
    grid, num_heads, dim = tuple(args.grid), args.heads, args.head_dim
    seq_len = math.prod(grid)
    generator = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(1, seq_len, num_heads, dim, generator=generator, device=device,
                           dtype=dtype) for _ in range(3))
    q_t, k_t, v_t = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, S, D] for SDPA / flex
    flex = flex_attention if args.no_compile else torch.compile(flex_attention, dynamic=False)
    dense_flops = 4 * seq_len**2 * num_heads * dim

    with torch.inference_mode():
        # fp32 reference through a kernel that never materialises the S x S scores.
        ref_kernel = SDPBackend.EFFICIENT_ATTENTION if device.type == "cuda" else SDPBackend.MATH
        with sdpa_kernel(ref_kernel):
            ref = F.scaled_dot_product_attention(q_t.float(), k_t.float(), v_t.float())

        runs: dict[str, Callable[[], torch.Tensor]] = {}
        for name, kernel in SDPA_KERNELS.items():
            runs[name] = (lambda kernel=kernel: _sdpa_with(kernel, q_t, k_t, v_t))
        runs["flex_dense"] = lambda: flex(q_t, k_t, v_t)
        cute_reason = cute_unavailable_reason(device, dtype, dim)
        if cute_reason is None:
            scale = dim**-0.5
            runs["flash_cute"] = lambda: flash_cute_attention(q, k, v, scale, False).transpose(1, 2)
            # The package's own tile choice, against the one our op picks (dense_kernel_config).
            runs["flash_cute package tiles"] = (
                lambda: _cute_tiles(q, k, v, scale, None).transpose(1, 2))
            for tile_mn in args.cute_tiles:
                runs[f"flash_cute {tile_mn}"] = (
                    lambda tile_mn=tile_mn: _cute_tiles(q, k, v, scale, tile_mn).transpose(1, 2))
        if args.cross_kv_len:
            # Video queries attending the text: short keys, where kernels rank differently.
            kv_len = args.cross_kv_len
            k_x, v_x = (torch.randn(1, kv_len, num_heads, dim, generator=generator,
                                    device=device, dtype=dtype) for _ in range(2))
            runs["cross_sdpa_cudnn"] = lambda: _sdpa_with(
                SDPBackend.CUDNN_ATTENTION, q_t, k_x.transpose(1, 2), v_x.transpose(1, 2))
            if cute_reason is None:
                runs["cross_flash_cute"] = lambda: flash_cute_attention(
                    q, k_x, v_x, dim**-0.5, False).transpose(1, 2)
            with sdpa_kernel(ref_kernel):
                cross_ref = F.scaled_dot_product_attention(
                    q_t.float(), k_x.transpose(1, 2).float(), v_x.transpose(1, 2).float())
        rows: dict[str, dict[str, Any]] = {}
        if cute_reason is not None:
            rows["flash_cute"] = {"skipped": cute_reason}
        for name, fn in runs.items():
            try:
                out = fn()
            except Exception as e:  # noqa: BLE001  # e.g. no cuDNN / flash kernel for this device or dtype
                rows[name] = {"skipped": str(e).splitlines()[0]}
                continue
            ms = time_ms(fn, device, args.iters, args.warmup)
            if name.startswith("cross_"):
                flops = dense_flops * args.cross_kv_len / seq_len
                rows[name] = {"ms": ms, "tflops": flops / ms / 1e9,
                              "rel_err": rel_err(out, cross_ref)}
                continue
            rows[name] = {"ms": ms, "tflops": dense_flops / ms / 1e9, "rel_err": rel_err(out, ref)}

        for window in args.windows:
            rows.update(bench_sta(args, window, q, k, v, ref, flex, dense_flops))

    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "dtype": str(dtype), "grid": list(grid),
              "seq_len": seq_len, "heads": num_heads, "head_dim": dim,
              "tile_size": list(args.tile_size), "compiled": not args.no_compile,
              "iters": args.iters, "results": rows}
    print(f"{result['device']}, torch {result['torch']}, {dtype}, {num_heads} heads x {seq_len} "
          f"tokens x {dim}, grid {grid}, tiles {tuple(args.tile_size)}")
    for name, row in rows.items():
        if "skipped" in row:
            print(f"{name:>24}: skipped ({row['skipped']})")
            continue
        speed = (f"{row['tflops']:7.1f} TFLOP/s" if "tflops" in row
                 else f"{row['effective_tflops']:7.1f} effective TFLOP/s")
        extra = (f", density {row['density']:.3f}, computed {row['computed_fraction']:.3f}"
                 if "density" in row else "")
        if "masked_sdpa_rel_err" in row:
            extra += f", vs masked SDPA {row['masked_sdpa_rel_err']:.2e}"
        print(f"{name:>24}: {row['ms']:9.3f} ms  {speed}  rel_err {row['rel_err']:.2e}{extra}")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))


def _sdpa_with(kernel: SDPBackend, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor:
    with sdpa_kernel(kernel):
        return F.scaled_dot_product_attention(q, k, v)


def bench_sta(args: argparse.Namespace, window: Window, q: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor, ref: torch.Tensor, flex: Callable[..., torch.Tensor],
              dense_flops: int) -> dict[str, dict[str, Any]]:
    device, grid, tile_size = q.device, tuple(args.grid), tuple(args.tile_size)
    layout = TileLayout(grid, tile_size, block_size=block_size_for(math.prod(tile_size), device))
    label = f"sta_{'x'.join(map(str, window))}"
    start = time.perf_counter()
    block_mask = get_sta_block_mask(layout, (window,), device)
    build_s = time.perf_counter() - start  # first build; includes compiling it on GPU

    def sta() -> torch.Tensor:
        return sliding_tile_attention(q, k, v, grid=grid, tile_size=tile_size, windows=window)

    q_l, k_l, v_l = (layout.to_tiles(x) for x in (q, k, v))

    def kernel() -> torch.Tensor:
        return flex(q_l, k_l, v_l, block_mask=block_mask)

    density = sta_block_density(grid, tile_size, window)
    # Pairs the kernel computes (padding included) over the dense pairs of the real tokens.
    computed = (1 - block_mask.sparsity() / 100) * layout.seq_len**2 / math.prod(grid)**2
    common = {"window": list(window), "density": density, "computed_fraction": computed}
    out = sta()
    sta_ms = time_ms(sta, device, args.iters, args.warmup)
    kernel_ms = time_ms(kernel, device, args.iters, args.warmup)
    rows = {}
    if cute_unavailable_reason(device, q.dtype, q.shape[-1]) is None:
        rows.update(bench_sta_cute(args, label, common, layout, window, block_mask, q_l, k_l,
                                   v_l, kernel(), dense_flops))
    for options in args.kernel_options:
        def tuned(options=options) -> torch.Tensor:
            return flex(q_l, k_l, v_l, block_mask=block_mask, kernel_options=options)
        try:
            tuned_ms = time_ms(tuned, device, args.iters, args.warmup)
        except Exception as e:  # noqa: BLE001 - an option this torch lacks: report, go on
            rows[f"{label}_kernel {json.dumps(options)}"] = {"skipped": str(e).splitlines()[0]}
            continue
        rows[f"{label}_kernel {json.dumps(options)}"] = {
            **common, "ms": tuned_ms, "effective_tflops": dense_flops / tuned_ms / 1e9,
            "rel_err": rel_err(layout.from_tiles(tuned()), ref.transpose(1, 2)),
            "max_abs_vs_default_options": (tuned() - kernel()).abs().max().item(),
            "masked_sdpa_rel_err": masked_sdpa_error(layout, window, q_l, k_l, v_l, tuned())}
    return rows | {
        label: {**common, "ms": sta_ms, "effective_tflops": dense_flops / sta_ms / 1e9,
                "rel_err": rel_err(out.transpose(1, 2), ref), "mask_build_s": build_s},
        f"{label}_kernel": {**common, "ms": kernel_ms,
                            "effective_tflops": dense_flops / kernel_ms / 1e9,
                            "rel_err": rel_err(out.transpose(1, 2), ref),
                            "masked_sdpa_rel_err": masked_sdpa_error(layout, window, q_l, k_l,
                                                                     v_l, kernel())},
    }


def bench_sta_cute(args: argparse.Namespace, label: str, common: dict[str, Any],
                   layout: TileLayout, window: Window, block_mask: Any, q_l: torch.Tensor,
                   k_l: torch.Tensor, v_l: torch.Tensor, flex_out: torch.Tensor,
                   dense_flops: int) -> dict[str, dict[str, Any]]:
    """The STA kernel on FlashAttention's CuTe block-sparse kernel, same block mask: padding
    keys masked in the kernel (`FASTVIDEO_STA_PADDING=mask`), zeroed and rescaled after
    (`rescale`, the default), and left unmasked (wrong output: a speed bound)."""
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
    from flash_attn.cute.interface import _flash_attn_fwd

    q_c, k_c, v_c = (x.transpose(1, 2) for x in (q_l, k_l, v_l))  # [B, L, H, D], contiguous
    scale = q_l.shape[-1] ** -0.5
    key_table = _key_table(layout, q_l.device)
    blocks = (block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.full_kv_num_blocks,
              block_mask.full_kv_indices)

    def kernel() -> torch.Tensor:
        return flash_cute_block_sparse_attention(q_c, k_c, v_c, *blocks, key_table,
                                                 layout.block_size, scale)

    padding = _padding_rescale(layout, (window,), q_l.device, True, True)
    every_row = torch.arange(layout.seq_len, device=q_l.device)
    k_z, v_z = (x.index_fill(1, padding.rows, 0) for x in (k_c, v_c))

    def rescaled() -> torch.Tensor:
        out, lse = flash_cute_block_sparse_unmasked(q_c, k_z, v_z, *blocks, layout.block_size,
                                                    scale)
        return unpad_softmax_rows(out, lse, padding.keys_per_row, every_row)

    def unmasked() -> torch.Tensor:
        sparse = BlockSparseTensorsTorch(*blocks, block_size=(layout.block_size,) * 2)
        return _flash_attn_fwd(q_c, k_c, v_c, softmax_scale=scale,
                               block_sparse_tensors=sparse)[0]

    rows = {}
    for name, fn in ((f"{label}_cute_kernel", kernel), (f"{label}_cute_rescaled", rescaled),
                     (f"{label}_cute_unmasked_bound", unmasked)):
        try:
            out = fn().transpose(1, 2)
        except Exception as e:  # noqa: BLE001 - report and go on with the other kernels
            rows[name] = {"skipped": f"{type(e).__name__}: {e}"[:300]}
            continue
        ms = time_ms(fn, q_l.device, args.iters, args.warmup)
        real, flex_real = layout.from_tiles(out), layout.from_tiles(flex_out)  # no padding rows
        rows[name] = {
            **common, "ms": ms, "effective_tflops": dense_flops / ms / 1e9,
            "max_abs_vs_flex": (real - flex_real).abs().max().item(),
            "rel_err": rel_err(real, flex_real.float()),
            "masked_sdpa_rel_err": masked_sdpa_error(layout, window, q_l, k_l, v_l, out)}
    return rows


if __name__ == "__main__":
    main()
