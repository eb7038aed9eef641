"""One DiT forward: our `WanTransformer3DModel` against diffusers', same weights, same process.

    python benchmarks/bench_dit.py --config 1.3b --dtype bf16 --iters 10 --warmup 3 --compile
    python benchmarks/bench_dit.py --config tiny --device cpu --dtype fp32 \
        --height 64 --width 64 --frames 9 --text-len 16        # CPU smoke test

Diffusers' model gets random weights and the fp32 islands `from_pretrained(torch_dtype=...)`
would give it (`_keep_in_fp32_modules`); ours loads its state dict through `load_weights`.
Timings alternate between the models after warm-up; the median is reported (CUDA events on
GPU, wall clock on CPU).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastvideo.fastvideo_args import parse_dtype
from fastvideo.models.compile import compile_repeated_blocks
from fastvideo.models.dits.wanvideo import WanTransformer3DModel

_COMMON = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16,
               text_dim=4096, freq_dim=256, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
CONFIGS: dict[str, dict[str, Any]] = {
    "1.3b": {**_COMMON, "num_layers": 30, "num_attention_heads": 12, "ffn_dim": 8960},
    "14b": {**_COMMON, "num_layers": 40, "num_attention_heads": 40, "ffn_dim": 13824},
    "tiny": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                 in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64,
                 num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                 rope_max_seq_len=64),
}
# Wan's VAE: 8x spatial, 4x temporal (first frame kept) compression.
VAE_SPATIAL, VAE_TEMPORAL = 8, 4


def parse_tile(text: str) -> tuple[int, ...] | str:
    """A `--*-tile` option: "auto" or t,h,w."""
    return text if text == "auto" else tuple(int(v) for v in text.split(","))


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    """The model config, video size and dtype options (shared with bench_dit_sp.py)."""
    parser.add_argument("--config", choices=sorted(CONFIGS), default="1.3b")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--text-len", type=int, default=512)
    parser.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_workload_args(parser)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true",
                        help="also time diffusers under torch.compile")
    parser.add_argument("--sta-windows", nargs="*", default=[],
                        help="also time sliding tile attention with these (t,h,w) tile windows, "
                             "e.g. 5,3,5 3,3,4 (on our compiled model with --compile)")
    parser.add_argument("--sta-tile", type=parse_tile, default="auto",
                        help="STA tile size t,h,w, or auto (choose_tile_size: (3, 6, 7) at 480p)")
    parser.add_argument("--also-backends", nargs="*", default=[],
                        help="also time ours with these attention backends requested (e.g. "
                             "TORCH_SDPA); `ours` takes the layers' own choice")
    parser.add_argument("--json-out", type=Path, help="write the results as JSON here")
    return parser.parse_args()


def backends_used(model: nn.Module) -> list[str]:
    """The attention backends `model`'s layers chose on their last inputs, with the kernel
    FLASH_ATTN runs and the kernel STA runs with."""
    from fastvideo.attention.backends.flash_cute import cute_unavailable_reason
    from fastvideo.attention.layer import _AttentionLayer

    names = set()
    for layer in model.modules():
        if isinstance(layer, _AttentionLayer):
            for (dtype, device), backend in layer._backends.items():
                name = backend.name.name
                if name in ("FLASH_ATTN", "SLIDING_TILE_ATTN"):
                    cute = cute_unavailable_reason(device, dtype, layer.head_size) is None
                    name += " (flash_cute)" if cute else (
                        " (flex)" if name == "SLIDING_TILE_ATTN" else " (flash_attn 2)")
                names.add(name)
    return sorted(names)


def build_models(config: dict[str, Any], device: torch.device,
                 dtype: torch.dtype) -> tuple[nn.Module, WanTransformer3DModel]:
    from diffusers import WanTransformer3DModel as DiffusersWan

    # Created directly in `dtype` on the device: a 14B model would not fit twice in fp32.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            reference = DiffusersWan(**config).eval()
            ours = WanTransformer3DModel.from_config(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    for name, param in reference.named_parameters():
        if any(part in reference._keep_in_fp32_modules for part in name.split(".")):
            param.data = param.data.float()
    # Cast first, so the fp32-kept parameters receive diffusers' fp32 values unrounded.
    ours.to_compute_dtype(dtype)
    missing, unexpected = ours.load_weights(reference.state_dict().items())
    if missing or unexpected:
        raise RuntimeError(f"weights do not match: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
    return reference, ours


def make_inputs(config: dict[str, Any], args: argparse.Namespace, device: torch.device,
                dtype: torch.dtype) -> dict[str, torch.Tensor]:
    if (args.frames - 1) % VAE_TEMPORAL or args.height % VAE_SPATIAL or args.width % VAE_SPATIAL:
        raise ValueError(f"frames must be 4k+1 and height/width multiples of {VAE_SPATIAL}")
    latent_shape = (1, config["in_channels"], (args.frames - 1) // VAE_TEMPORAL + 1,
                    args.height // VAE_SPATIAL, args.width // VAE_SPATIAL)
    generator = torch.Generator(device).manual_seed(0)
    return {
        "hidden_states": torch.randn(latent_shape, generator=generator, device=device, dtype=dtype),
        "encoder_hidden_states": torch.randn(1, args.text_len, config["text_dim"],
                                             generator=generator, device=device, dtype=dtype),
        # What WanPipeline passes: the scheduler's fp32 timestep, one per sample.
        "timestep": torch.tensor([999.0], device=device),
    }


def time_once(fn: Callable[[], torch.Tensor], device: torch.device) -> float:
    """Milliseconds of one call."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e3


def idle_gaps(spans: Iterable[tuple[float, float, str]]) -> list[tuple[float, str, str]]:
    """The gaps inside the union of `(start, end, name)` intervals, longest first, each as
    (length, name of the interval before it, name of the one after it)."""
    gaps: list[tuple[float, str, str]] = []
    busy_until, name_before = None, ""
    for start, end, name in sorted(spans):
        if busy_until is not None and start > busy_until:
            gaps.append((start - busy_until, name_before, name))
        if busy_until is None or end > busy_until:
            busy_until, name_before = end, name
    return sorted(gaps, reverse=True)


def covered_us(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of `(start, end)` intervals."""
    intervals = list(intervals)
    if not intervals:
        return 0.0
    span = max(end for _, end in intervals) - min(start for start, _ in intervals)
    return span - sum(gap for gap, _, _ in idle_gaps((s, e, "") for s, e in intervals))


@contextmanager
def sm_carveout(num_sms: int | None) -> Iterator[None]:
    """Keep cuBLAS matmuls off `num_sms` SMs inside the block (None: leave it alone);
    torch's experimental carveout."""
    if num_sms is None:
        yield
        return
    torch._C._set_sm_carveout_experimental(num_sms)
    try:
        yield
    finally:
        torch._C._set_sm_carveout_experimental(None)


def peak_memory_gib(fn: Callable[[], torch.Tensor], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    return torch.cuda.max_memory_allocated(device) / 2**30


def time_sta(model: nn.Module, inputs: dict[str, torch.Tensor], args: argparse.Namespace,
             device: torch.device, dense: torch.Tensor) -> list[dict[str, Any]]:
    """Time `model` with sliding tile attention at each window; error against dense."""
    from fastvideo.attention.backends.sliding_tile import (
        TileLayout,
        block_size_for,
        sta_block_density,
    )
    from fastvideo.attention.layer import request_attention_backend
    from fastvideo.attention.metadata import AttentionMetadata
    from fastvideo.attention.sta_config import STAConfig, resolve_tile_size

    latent = inputs["hidden_states"].shape[2:]
    grid = (latent[0], latent[1] // 2, latent[2] // 2)
    tile = resolve_tile_size(args.sta_tile, grid)
    layout = TileLayout(grid, tile, block_size=block_size_for(math.prod(tile), device))
    padding = layout.num_tiled_video_tokens / layout.num_video_tokens
    from fastvideo.attention.backends.flash_cute import cute_unavailable_reason
    from fastvideo.attention.backends.sliding_tile import STA_KERNEL_ENV

    kernels = ["flex"]
    if cute_unavailable_reason(device, dense.dtype, 128) is None:
        kernels.insert(0, "flash_cute")
    previous_backends = {m: m.requested_backend for m in model.modules()
                         if hasattr(m, "requested_backend")}
    request_attention_backend(model, "SLIDING_TILE_ATTN")
    results = []
    previous_kernel = os.environ.get(STA_KERNEL_ENV)
    try:
        for spec, kernel in itertools.product(args.sta_windows, kernels):
            os.environ[STA_KERNEL_ENV] = kernel
            window = tuple(int(v) for v in spec.split(","))
            config = STAConfig(tile_size=tile, default_window=window)
            forward = functools.partial(model, **inputs,
                                        attn_metadata=AttentionMetadata(sta_config=config))
            with torch.inference_mode():
                out = forward().float()
                for _ in range(args.warmup):
                    time_once(forward, device)
                ms = statistics.median(time_once(forward, device) for _ in range(args.iters))
            ref = dense.float()
            entry = {"window": window, "tile": tile, "kernel": kernel, "median_ms": ms,
                     "density": sta_block_density(grid, tile, window),
                     # Work relative to dense attention over the real tokens.
                     "computed_fraction": sta_block_density(grid, tile, window) * padding**2,
                     "rel_l2_vs_dense": ((out - ref).norm() / ref.norm()).item(),
                     "max_abs_vs_dense": (out - ref).abs().max().item()}
            same = [r for r in results if r["window"] == window]
            if same:  # the other kernel on the same window: how far apart the outputs are
                entry["rel_l2_vs_" + same[0]["kernel"]] = (
                    (out - same[0].pop("_out")).norm() / out.norm()).item()
            else:
                entry["_out"] = out
            print(f"STA tile {tile} window {window} on {kernel}: {ms:.2f} ms, density "
                  f"{entry['density']:.3f} (computed {entry['computed_fraction']:.3f} of "
                  f"dense), rel L2 vs dense {entry['rel_l2_vs_dense']:.3e}")
            results.append(entry)
    finally:
        if previous_kernel is None:
            os.environ.pop(STA_KERNEL_ENV, None)
        else:
            os.environ[STA_KERNEL_ENV] = previous_kernel
    for entry in results:
        entry.pop("_out", None)
    for layer, backend in previous_backends.items():
        layer.request_backend(backend)
    return results


def main() -> None:
    args = parse_args()
    device, dtype = torch.device(args.device), parse_dtype(args.dtype)
    config = CONFIGS[args.config]
    reference, ours = build_models(config, device, dtype)
    inputs = make_inputs(config, args, device, dtype)

    runs: dict[str, Callable[[], torch.Tensor]] = {
        "diffusers": lambda: reference(**inputs, return_dict=False)[0],
        "ours": lambda: ours(**inputs),
    }
    if args.compile:
        compiled = torch.compile(reference)
        runs["diffusers_compiled"] = lambda: compiled(**inputs, return_dict=False)[0]
        # Ours as the engine runs it with `enable_torch_compile`: blocks compiled one by one.
        ours_compiled = WanTransformer3DModel.from_config(config).to(device).eval()
        ours_compiled.to_compute_dtype(dtype)
        ours_compiled.load_weights(ours.state_dict().items())
        compile_repeated_blocks(ours_compiled, dtype=dtype)
        runs["ours_compiled"] = lambda: ours_compiled(**inputs)
    models = {"ours": ours} | ({"ours_compiled": ours_compiled} if args.compile else {})
    for backend in args.also_backends:
        from fastvideo.attention.layer import request_attention_backend

        for name, compile_it in (("ours", False), ("ours_compiled", True))[:1 + args.compile]:
            model = WanTransformer3DModel.from_config(config).to(device).eval()
            model.to_compute_dtype(dtype)
            model.load_weights(ours.state_dict().items())
            request_attention_backend(model, backend)
            if compile_it:
                compile_repeated_blocks(model, dtype=dtype)
            models[f"{name}_{backend}"] = model
            runs[f"{name}_{backend}"] = lambda model=model: model(**inputs)

    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        outputs = {name: fn() for name, fn in runs.items()}
        memory = {name: peak_memory_gib(fn, device) for name, fn in runs.items()}
        for _ in range(args.warmup):
            for fn in runs.values():
                time_once(fn, device)
        for _ in range(args.iters):  # interleaved, so clock drift hits every model alike
            for name, fn in runs.items():
                times[name].append(time_once(fn, device))

    attention_backends = {name: backends_used(m) for name, m in models.items()}
    if args.sta_windows:
        model = ours_compiled if args.compile else ours
        result_sta = time_sta(model, inputs, args, device, outputs["ours"])
    median_ms = {name: statistics.median(t) for name, t in times.items()}
    expected = outputs["diffusers"].float()
    result = {
        "config": args.config, "device": torch.cuda.get_device_name(device)
        if device.type == "cuda" else "cpu", "torch": torch.__version__, "dtype": str(dtype),
        "latent_shape": list(inputs["hidden_states"].shape), "text_len": args.text_len,
        "iters": args.iters, "warmup": args.warmup, "median_ms": median_ms,
        "all_ms": times, "peak_memory_gib": memory,
        "ratio_ours_over_diffusers": median_ms["ours"] / median_ms["diffusers"],
        "max_abs_diff": (outputs["ours"].float() - expected).abs().max().item(),
        "max_abs_diff_to_diffusers": {name: (out.float() - expected).abs().max().item()
                                      for name, out in outputs.items()},
        "attention_backends": attention_backends,
        "max_abs_output": expected.abs().max().item(),
    }
    if args.compile:
        result["ratio_ours_compiled_over_diffusers_compiled"] = (
            median_ms["ours_compiled"] / median_ms["diffusers_compiled"])
        result["max_abs_diff_ours_compiled"] = (
            outputs["ours_compiled"].float() - expected).abs().max().item()
    if args.sta_windows:
        result["sta"] = result_sta
    for name, ms in median_ms.items():
        mem = f", peak {memory[name]:.2f} GiB" if memory[name] is not None else ""
        used = result["attention_backends"].get(name)
        used = f", attention {', '.join(used)}" if used else ""
        print(f"{name:>28}: {ms:9.2f} ms (median of {args.iters}){mem}{used}, max |diff to "
              f"diffusers| {result['max_abs_diff_to_diffusers'][name]:.2e}")
    print(f"ours / diffusers eager: {result['ratio_ours_over_diffusers']:.3f}")
    if args.compile:
        print(f"ours compiled / diffusers compiled: "
              f"{result['ratio_ours_compiled_over_diffusers_compiled']:.3f}")
    print(f"max |ours - diffusers| = {result['max_abs_diff']:.3e} "
          f"(max |output| = {result['max_abs_output']:.3f})")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
