"""GPU check of STA's two ways of leaving out padding keys on FlashAttention's CuTe kernel
(`FASTVIDEO_STA_PADDING`): `mask` (the kernel masks them per score) against `rescale` (the
keys zeroed and attended, each row scaled by S / (S - n) after), at Wan2.1 480p shapes,
through the engine's `sliding_tile_attention`: max and relative differences, and the time
of each whole call (reorder, kernel, rescale, reorder back).

    python benchmarks/check_gpu_sta_padding.py --json-out sta_padding.json

Fails (exit 1) past the bf16 tolerance. The scales stretch the scores (q multiplied by
them): 1 is unit-variance q and k; 4 gives scores of spread ~4, rows dominated by a few keys.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
from bench_dit import time_once  # the script's folder is on sys.path

from fastvideo.attention.backends.flash_cute import cute_unavailable_reason
from fastvideo.attention.backends.sliding_tile import STA_PADDING_ENV, sliding_tile_attention

TOLERANCE = 2e-2  # two bf16 kernels on unit-variance values: a few ulps (check_gpu_cute.py)


def time_call(fn, iters: int = 20, warmup: int = 3) -> float:
    """Median ms of one call on the GPU."""
    for _ in range(warmup):
        fn()
    return statistics.median(time_once(fn, torch.device("cuda")) for _ in range(iters))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", type=int, nargs=3, default=[21, 30, 52])
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--windows", nargs="+", default=["4,3,6", "3,3,4"])
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    reason = cute_unavailable_reason("cuda", torch.bfloat16, 128)
    if reason is not None:
        print(f"FlashAttention's CuTe kernel cannot run here: {reason}")
        return 1
    grid, generator = tuple(args.grid), torch.Generator("cuda").manual_seed(0)
    tokens = grid[0] * grid[1] * grid[2]
    q, k, v = (torch.randn(1, tokens, args.heads, 128, generator=generator, device="cuda",
                           dtype=torch.bfloat16) for _ in range(3))
    results, failed = {}, False
    for text in args.windows:
        window = tuple(int(x) for x in text.split(","))
        for scale in args.scales:
            outs, times, q_scaled = {}, {}, q * scale
            for mode in ("mask", "rescale"):
                os.environ[STA_PADDING_ENV] = mode  # read by each call

                def call(q_scaled=q_scaled, window=window) -> torch.Tensor:
                    return sliding_tile_attention(q_scaled, k, v, grid=grid, tile_size="auto",
                                                  windows=window)

                outs[mode] = call()
                times[mode] = time_call(call)
            diff = (outs["rescale"].float() - outs["mask"].float())
            row = {"max_abs": diff.abs().max().item(),
                   "rel_l2": (diff.norm() / outs["mask"].float().norm()).item(),
                   "mask_ms": times["mask"], "rescale_ms": times["rescale"]}
            name = f"window {window} scale {scale:g}"
            results[name] = row
            bad = not row["max_abs"] <= TOLERANCE
            failed |= bad
            print(f"{name}: mask {row['mask_ms']:.3f} ms, rescale {row['rescale_ms']:.3f} ms "
                  f"({row['mask_ms'] / row['rescale_ms']:.3f}x); max abs diff "
                  f"{row['max_abs']:.2e}, rel L2 {row['rel_l2']:.2e}{'  FAIL' if bad else ''}")
    os.environ.pop(STA_PADDING_ENV, None)
    pair, bad = check_pair(q, k, v, grid, tuple(int(x) for x in args.windows[0].split(",")))
    failed |= bad
    if args.json_out:
        args.json_out.write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                             "results": results, "pair": pair}, indent=2))
    return 1 if failed else 0


def check_pair(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, ...],
               window: tuple[int, ...]) -> tuple[dict[str, float], bool]:
    """A guidance pair (batch 2) against each item alone, and the time of each; the row
    gather of a batch of 2 as the engine does it (`select_rows`) against index_select."""
    from fastvideo.attention.backends.sliding_tile import (
        TileLayout,
        _tile_indices,
        block_size_for,
        select_rows,
    )
    from fastvideo.attention.sta_config import resolve_tile_size

    q2, k2, v2 = (torch.cat([x, x.flip(1)]) for x in (q, k, v))  # two different items

    def call(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return sliding_tile_attention(a, b, c, grid=grid, tile_size="auto", windows=window)

    paired = call(q2, k2, v2)
    alone = torch.cat([call(q2[i:i + 1], k2[i:i + 1], v2[i:i + 1]) for i in range(2)])
    tile = resolve_tile_size("auto", grid)
    layout = TileLayout(grid, tile, 0, block_size_for(tile[0] * tile[1] * tile[2], q.device))
    gather = _tile_indices(layout, q.device)[0]
    row = {"max_abs_vs_alone": (paired.float() - alone.float()).abs().max().item(),
           "pair_ms": time_call(lambda: call(q2, k2, v2)),
           "two_alone_ms": 2 * time_call(lambda: call(q, k, v)),
           "gather_index_select_ms": time_call(lambda: q2.index_select(1, gather)),
           "gather_select_rows_ms": time_call(lambda: select_rows(q2, gather))}
    bad = not row["max_abs_vs_alone"] <= TOLERANCE
    print(f"guidance pair, window {window}: {row['pair_ms']:.3f} ms against two alone "
          f"{row['two_alone_ms']:.3f} ms; max abs diff to each alone "
          f"{row['max_abs_vs_alone']:.2e}{'  FAIL' if bad else ''}; gather of q: index_select "
          f"{row['gather_index_select_ms']:.3f} ms, select_rows "
          f"{row['gather_select_rows_ms']:.3f} ms")
    return row, bad


if __name__ == "__main__":
    sys.exit(main())
