"""Where the time of one DiT forward goes: GPU kernel time by kind (matmul, attention,
fused element-wise, communication, other) and the top kernels, from `torch.profiler`.

    python benchmarks/profile_dit.py --compile                     # dense, compiled blocks
    python benchmarks/profile_dit.py --compile --sta-window 5,3,5 --sta-tile auto

Our model only (no baseline): it explains the figures `bench_dit.py` measures against
diffusers, it does not replace them.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from bench_dit import (  # the script's folder is on sys.path
    CONFIGS,
    add_workload_args,
    idle_gaps,
    make_inputs,
    parse_tile,
    time_once,
)
from torch.profiler import ProfilerActivity, profile

from fastvideo.fastvideo_args import parse_dtype
from fastvideo.models.compile import compile_repeated_blocks
from fastvideo.models.dits.wanvideo import WanTransformer3DModel

_KINDS = (
    ("attention", re.compile(r"cudnn|fmha|flash|attention|flex|triton_tem_fused", re.I)),
    ("matmul", re.compile(r"gemm|sm90_xmma|cutlass|nvjet|wgmma|ampere_.*_s16816", re.I)),
    ("communication", re.compile(r"nccl", re.I)),
    ("fused element-wise", re.compile(r"^triton_", re.I)),
)


def kind_of(name: str) -> str:
    for kind, pattern in _KINDS:
        if pattern.search(name):
            return kind
    return "other (eager element-wise, copies)"


def gpu_idle(events: list) -> tuple[float, float, list[tuple[float, str, str]]]:
    """(span, idle time within it, largest gaps as (ms, kernel before, kernel after)) of GPU
    events, in ms: idle time is where the host did not keep the GPU fed (a sync, slow
    launches)."""
    if not events:
        return 0.0, 0.0, []
    spans = [(e.time_range.start, e.time_range.end, e.name) for e in events]
    gaps = [(us / 1e3, before, after) for us, before, after in idle_gaps(spans)]
    span_us = max(end for _, end, _ in spans) - min(start for start, _, _ in spans)
    return span_us / 1e3, sum(ms for ms, _, _ in gaps), gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_args(parser)
    parser.add_argument("--compile", action="store_true", help="compile the blocks")
    parser.add_argument("--compile-mode", default=None)
    parser.add_argument("--sta-window", default=None, help="STA window t,h,w (default dense)")
    parser.add_argument("--sta-tile", type=parse_tile, default="auto")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), parse_dtype(args.dtype)
    config = CONFIGS[args.config]
    with torch.device(device):
        model = WanTransformer3DModel.from_config(config).eval()
    # Random weights, as bench_dit.py's: uninitialised (often zero) memory makes the tensor
    # cores draw less power, and an H100 then holds higher clocks (~15% faster forwards).
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(std=param.shape[-1] ** -0.5 if param.dim() > 1 else 0.02)
    model.to_compute_dtype(dtype)
    if args.compile:
        compile_repeated_blocks(model, mode=args.compile_mode, dtype=dtype)
    inputs = make_inputs(config, args, device, dtype)

    if args.sta_window:
        from fastvideo.attention.layer import request_attention_backend
        from fastvideo.attention.metadata import AttentionMetadata
        from fastvideo.attention.sta_config import STAConfig

        window = tuple(int(v) for v in args.sta_window.split(","))
        request_attention_backend(model, "SLIDING_TILE_ATTN")
        inputs["attn_metadata"] = AttentionMetadata(
            sta_config=STAConfig(tile_size=args.sta_tile, default_window=window))

    with torch.inference_mode():
        for _ in range(3):
            model(**inputs)
        ms = sorted(time_once(lambda: model(**inputs), device) for _ in range(5))[2]
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(**inputs)
            torch.cuda.synchronize(device)

    totals: dict[str, float] = defaultdict(float)
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    gpu_events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    for event in gpu_events:
        us = event.device_time
        totals[kind_of(event.name)] += us
        kernels[event.name][0] += us
        kernels[event.name][1] += 1
    gpu_ms = sum(totals.values()) / 1e3
    span_ms, idle_ms, gaps = gpu_idle(gpu_events)
    print(f"{args.config} {tuple(inputs['hidden_states'].shape)} {dtype} compile={args.compile} "
          f"sta={args.sta_window} tile={args.sta_tile}: forward {ms:.1f} ms (median of 5), "
          f"GPU kernels {gpu_ms:.1f} ms; profiled forward spans {span_ms:.1f} ms on the GPU, "
          f"{idle_ms:.1f} ms of it idle")
    for gap_ms, before, after in gaps[:5]:
        print(f"  idle {gap_ms:6.2f} ms between {before[:60]} and {after[:60]}")
    for kind, us in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:>36}: {us / 1e3:8.1f} ms")
    print("top kernels (ms total, calls):")
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:args.top]
    for name, (us, calls) in top:
        print(f"  {us / 1e3:8.2f} ms {calls:5d}x  {kind_of(name)[:10]:>10}  {name[:110]}")
    if args.json_out:
        args.json_out.write_text(json.dumps({
            "forward_ms": ms, "gpu_kernel_ms": gpu_ms, "gpu_span_ms": span_ms,
            "gpu_idle_ms": idle_ms, "by_kind_ms": {
                k: v / 1e3 for k, v in totals.items()},
            "top": [{"name": n, "ms": us / 1e3, "calls": c} for n, (us, c) in top]}, indent=2))


if __name__ == "__main__":
    main()
