"""Wan VAE decode at 480x832x81: diffusers' `AutoencoderKLWan` as the pipeline runs it,
against variants of the same weights, same process, same latents.

    python benchmarks/bench_vae_decode.py --json-out vae.json            # on a GPU
    python benchmarks/bench_vae_decode.py --device cpu --latent 2,8,8 --iters 1

The decode runs beside the next item's denoising in a bulk run, where every millisecond
of it is taken from the DiT; this measures what each variant costs and how far its frames
move from the fp32 reference (`[-1, 1]` range). `--profile [VARIANT]` adds a kernel-time breakdown of
one variant's decode (the reference by default). Variants: `diffusers` (the reference), `channels_last`,
`engine` (channels-last and the lean element-wise ops: what the engine does on CUDA) and
`ours_compiled` (`fastvideo.models.vae_speed`; not used by the engine, see that module),
`bf16` (for scale only: the engine decodes in fp32).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from bench_dit import time_once  # noqa: E402
from bench_hunyuan_dit import synchronize  # noqa: E402

from fastvideo.models.vae_speed import speed_up_vae, vae_input  # noqa: E402


def build_vae(device: str) -> Any:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan()  # the defaults are Wan2.1's VAE; PyTorch's init weights
    return vae.to(device).eval()


def _decode_into(out: list[torch.Tensor], vae: Any, x: torch.Tensor) -> None:
    out[:] = [vae.decode(x, return_dict=False)[0]]


def _channels_last(vae: Any) -> torch.dtype:
    speed_up_vae(vae, channels_last=True, compile_blocks=False, lean_ops=False)
    return torch.float32


def _engine(vae: Any) -> torch.dtype:
    speed_up_vae(vae, channels_last=True, compile_blocks=False)
    return torch.float32


def _compiled(vae: Any) -> torch.dtype:
    speed_up_vae(vae, channels_last=True, compile_blocks=True)
    return torch.float32


def _bf16(vae: Any) -> torch.dtype:
    vae.to(torch.bfloat16)
    return torch.bfloat16


# name -> set-up of a freshly built fp32 VAE, returning the dtype its input takes.
VARIANTS: dict[str, Callable[[Any], torch.dtype]] = {
    "diffusers": lambda vae: torch.float32,  # the reference: as the pipeline runs it
    "channels_last": _channels_last,
    "engine": _engine,  # channels-last + lean ops: what the engine does on CUDA
    "ours_compiled": _compiled,
    "bf16": _bf16,  # for scale only: the engine decodes in fp32
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--latent", default="21,60,104", help="T,H,W of the latents")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--profile", nargs="?", const="diffusers", metavar="VARIANT",
                        help="kernel-time breakdown of one variant's decode (default diffusers)")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    t, h, w = (int(v) for v in args.latent.split(","))
    dev = args.device
    device = torch.device(dev)
    torch.manual_seed(1)
    z = torch.randn(1, 16, t, h, w, device=dev)
    result: dict[str, Any] = {"latent": [1, 16, t, h, w], "device": torch.cuda.get_device_name() if
                              dev.startswith("cuda") else "cpu", "torch": torch.__version__}
    if args.profile and args.profile not in args.variants.split(","):
        raise SystemExit(f"--profile {args.profile!r} is not among --variants {args.variants}")
    base_vae = build_vae(dev)
    ref: torch.Tensor | None = None
    profiled: tuple[Any, torch.Tensor] | None = None
    for name in args.variants.split(","):
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
        vae = base_vae if name == "diffusers" else build_vae(dev)
        dtype = VARIANTS[name](vae)
        x = vae_input(vae, z.to(dtype))
        out: list[torch.Tensor] = []
        decode = partial(_decode_into, out, vae, x)
        with torch.no_grad():
            first = time_once(decode, device) / 1e3  # warm-up (and compile)
            times = [time_once(decode, device) / 1e3 for _ in range(args.iters)]
        frames = out[0].float()
        entry: dict[str, Any] = {"median_s": statistics.median(times), "all_s": times,
                                 "first_call_s": first}
        if ref is None:
            ref = frames
        else:
            d = (frames - ref).abs()
            entry["max_abs_diff"] = d.max().item()
            entry["mean_abs_diff"] = d.mean().item()
        if dev.startswith("cuda"):
            entry["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        result[name] = entry
        print(name, json.dumps(entry), flush=True)
        if name == args.profile:
            profiled = (vae, x)
        del vae
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA if dev.startswith("cuda")
                                                   else ProfilerActivity.CPU]) as prof:
            assert profiled is not None
            profiled[0].decode(profiled[1], return_dict=False)
            synchronize(device)
        rows = []
        for e in prof.key_averages():
            us = (e.device_time_total if dev.startswith("cuda") else e.self_cpu_time_total)
            if us:
                rows.append((us / 1e3, e.count, e.key[:90]))
        rows.sort(reverse=True)
        result["profile_ms"] = [list(r) for r in rows[:25]]
        result["profiled_variant"] = args.profile
        for r in rows[:25]:
            print(f"{r[0]:9.1f} ms {r[1]:6d}x {r[2]}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
