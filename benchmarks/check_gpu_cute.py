"""GPU check of the engine's FlashAttention CuTe paths against PyTorch's kernels, on the
cases the DiT benchmarks do not cover: a batch of 2 (guidance pairs) attending through a
block mask built for one item, per-head windows, grids that are not whole tiles, text
tokens and small head sizes.

    python benchmarks/check_gpu_cute.py --json-out cute.json      # Hopper/Blackwell + flash-attn-4

Each case prints its max abs difference and fails (exit 1) past the bf16 tolerance.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from fastvideo.attention.backends.flash_cute import cute_unavailable_reason, flash_cute_attention
from fastvideo.attention.backends.sliding_tile import STA_KERNEL_ENV, sliding_tile_attention

TOLERANCE = 2e-2
"""Max abs difference allowed between two bf16 kernels on unit-variance inputs (outputs
are averages of values ~N(0, 1): a few bf16 ulps)."""


def _randn(*shape: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, device="cuda", dtype=torch.bfloat16)


def dense_cases(generator: torch.Generator) -> dict[str, float]:
    out = {}
    for batch, seq, kv_seq, heads, dim in [(2, 32760, 32760, 12, 128), (2, 1000, 512, 4, 64),
                                           (1, 777, 777, 2, 16), (2, 4096, 4096, 3, 128)]:
        q = _randn(batch, seq, heads, dim, generator=generator)
        k, v = (_randn(batch, kv_seq, heads, dim, generator=generator) for _ in range(2))
        got = flash_cute_attention(q, k, v, dim**-0.5, False)
        want = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)))
        out[f"dense B{batch} S{seq} Skv{kv_seq} H{heads} D{dim}"] = (
            got - want.transpose(1, 2)).abs().max().item()
    return out


def sta_cases(generator: torch.Generator) -> dict[str, float]:
    """CuTe STA against FlexAttention STA (the CPU-tested kernel) on the same inputs."""
    out = {}
    cases = [  # grid, tile, windows, text tokens, batch, heads
        ((21, 30, 52), (3, 6, 7), [(4, 3, 6)], 512, 2, 12),
        ((21, 30, 52), (3, 6, 7), [(4, 3, 6), (3, 3, 4), (7, 5, 8)] * 4, 512, 2, 12),
        ((5, 9, 11), (2, 4, 4), [(2, 2, 2)], 7, 2, 3),
        ((3, 16, 16), (1, 8, 16), [(1, 1, 1)], 0, 1, 2),
    ]
    for grid, tile, windows, text, batch, heads in cases:
        seq = math.prod(grid) + text
        q, k, v = (_randn(batch, seq, heads, 128, generator=generator) for _ in range(3))
        results = {}
        for kernel in ("flash_cute", "flex"):
            os.environ[STA_KERNEL_ENV] = kernel
            results[kernel] = sliding_tile_attention(
                q, k, v, grid=grid, tile_size=tile,
                windows=windows if len(windows) > 1 else windows[0], num_text_tokens=text)
        # Item 1 of the pair must not depend on being batched with item 0.
        os.environ[STA_KERNEL_ENV] = "flash_cute"
        alone = sliding_tile_attention(q[-1:], k[-1:], v[-1:], grid=grid, tile_size=tile,
                                       windows=windows if len(windows) > 1 else windows[0],
                                       num_text_tokens=text)
        name = f"sta grid {grid} tile {tile} {len(windows)} window(s) text {text} B{batch}"
        out[name] = (results["flash_cute"] - results["flex"]).abs().max().item()
        out[name + ", last item alone"] = (alone - results["flash_cute"][-1:]).abs().max().item()
    os.environ.pop(STA_KERNEL_ENV, None)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    reason = cute_unavailable_reason("cuda", torch.bfloat16, 128)
    if reason is not None:
        sys.exit(f"FlashAttention's CuTe kernels cannot run here: {reason}")
    generator = torch.Generator("cuda").manual_seed(0)
    with torch.inference_mode():
        diffs = dense_cases(generator) | sta_cases(generator)
    failed = {name: d for name, d in diffs.items() if not d <= TOLERANCE}
    for name, diff in diffs.items():
        print(f"{'FAIL' if name in failed else 'ok  '} {name}: max abs diff {diff:.3e}")
    if args.json_out:
        args.json_out.write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                             "tolerance": TOLERANCE, "max_abs_diff": diffs},
                                            indent=2))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
