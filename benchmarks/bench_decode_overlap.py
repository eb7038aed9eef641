"""What a VAE decode beside denoising costs the DiT, as a warm worker runs them: the DiT's
forwards in the main thread on a high-priority CUDA stream, alone and while a second thread
decodes video after video on a low-priority stream. Same weights, inputs and process.

    python benchmarks/bench_decode_overlap.py --compile --json-out overlap.json  # GPU, Wan 1.3B
    python benchmarks/bench_decode_overlap.py --smoke --json-out overlap.json    # CPU

Reports ms per forward alone and beside a decode (the mean of `--forwards` forwards
synchronised once, a guidance pair each as `batch_cfg` runs them), and the seconds each
decode took beside them. Random weights (diffusers' Wan VAE with its Wan2.1 configuration).
Session 19 also ran the decoder paced (its thread waiting for each chunk before launching
the next): 928.9 ms per forward against 928.7 unpaced, so pacing was dropped.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from bench_dit import (  # the script's folder is on sys.path
    CONFIGS,
    VAE_SPATIAL,
    VAE_TEMPORAL,
    add_workload_args,
    make_inputs,
)
from diffusers import AutoencoderKLWan

from fastvideo.fastvideo_args import parse_dtype
from fastvideo.models.compile import compile_repeated_blocks
from fastvideo.models.compile_cache import configure_compile_cache, configure_kernel_cache
from fastvideo.models.dits.wanvideo import WanTransformer3DModel
from fastvideo.models.vae_speed import speed_up_vae, vae_input

TINY_VAE = {"base_dim": 8, "z_dim": 4, "dim_mult": [1, 2], "num_res_blocks": 1,
            "temperal_downsample": [True]}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_args(parser)
    parser.add_argument("--compile", action="store_true", help="compile the DiT's blocks")
    parser.add_argument("--compile-cache-dir", type=Path,
                        help="torch.compile's and the CuTe kernels' caches (a bulk run's "
                             "--compile-cache-dir reuses its compiled blocks)")
    parser.add_argument("--forwards", type=int, default=20)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny DiT and VAE, small video, CPU fp32 (a test of the script)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    if args.smoke:
        args.config, args.device, args.dtype = "tiny", "cpu", "fp32"
        args.height = args.width = 32
        args.frames, args.text_len, args.forwards = 5, 8, 3
    return args


def build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    config = CONFIGS[args.config]
    with torch.device(device):
        model = WanTransformer3DModel.from_config(config).eval()
    with torch.no_grad():  # random weights, as bench_dit.py's (zeros run at other clocks)
        for param in model.parameters():
            param.normal_(std=param.shape[-1] ** -0.5 if param.dim() > 1 else 0.02)
    model.to_compute_dtype(dtype)
    if args.compile:
        if args.compile_cache_dir is not None:
            configure_kernel_cache(args.compile_cache_dir)
            configure_compile_cache(args.compile_cache_dir)
        compile_repeated_blocks(model, dtype=dtype)
    single = make_inputs(config, args, device, dtype)
    inputs = {name: torch.cat([value] * 2) if name != "timestep" else value.repeat(2)
              for name, value in single.items()}  # a guidance pair

    torch.manual_seed(0)
    vae = AutoencoderKLWan(**(TINY_VAE if args.smoke else {})).eval().to(device)
    if device.type == "cuda":  # as the worker loads it
        speed_up_vae(vae, channels_last=True, compile_blocks=False)
    z_dim = vae.config.z_dim
    latents = torch.randn(1, z_dim, (args.frames - 1) // VAE_TEMPORAL + 1,
                          args.height // VAE_SPATIAL, args.width // VAE_SPATIAL, device=device)
    return model, inputs, vae, latents


def stream(device: torch.device, high_priority: bool) -> Any:
    if device.type != "cuda":
        return None
    return torch.cuda.Stream(device, priority=-100 if high_priority else 0)


def decode_loop(vae: Any, latents: torch.Tensor, side: Any, stop: threading.Event,
                seconds: list[float]) -> None:
    """Decode until `stop` (at least once), as the worker's post lane does (on its own
    stream)."""
    if side is not None:
        torch.cuda.set_stream(side)
    with torch.no_grad():
        while True:
            start = time.perf_counter()
            vae.decode(vae_input(vae, latents), return_dict=False)
            if side is not None:
                side.synchronize()  # leaves the GIL while it waits
            seconds.append(time.perf_counter() - start)
            if stop.is_set():
                break


def time_forwards(model: Any, inputs: dict[str, Any], count: int, main: Any) -> float:
    """ms per forward over `count` forwards synchronised once at the end, as a denoising
    loop runs them (its launches may run a forward ahead of the GPU)."""
    with torch.inference_mode(), (torch.cuda.stream(main) if main is not None else nullcontext()):
        start = time.perf_counter()
        for _ in range(count):
            model(**inputs)
        if main is not None:
            main.synchronize()
        return (time.perf_counter() - start) * 1e3 / count


def main() -> None:
    args = parse_args()
    device, dtype = torch.device(args.device), parse_dtype(args.dtype)
    model, inputs, vae, latents = build(args, device, dtype)
    main_stream = stream(device, high_priority=True)
    time_forwards(model, inputs, 3, main_stream)  # compile, warm up
    with torch.no_grad():
        vae.decode(vae_input(vae, latents), return_dict=False)  # cuDNN's first calls
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(device)
                               if device.type == "cuda" else "cpu",
                               "config": args.config, "compile": args.compile,
                               "video": [args.frames, args.height, args.width],
                               "ms_per_forward": {}, "decode_s": {}}
    for mode in ("alone", "beside_decode"):
        stop, seconds = threading.Event(), []
        worker = None
        if mode != "alone":
            worker = threading.Thread(target=decode_loop, args=(
                vae, latents, stream(device, high_priority=False), stop, seconds))
            worker.start()
        ms = time_forwards(model, inputs, args.forwards, main_stream)
        stop.set()
        if worker is not None:
            worker.join()
            results["decode_s"][mode] = [round(s, 3) for s in seconds]
        results["ms_per_forward"][mode] = ms
        print(f"{mode:13s} {ms:8.1f} ms per forward"
              + (f", decodes beside it: {[round(s, 2) for s in seconds]} s" if seconds else ""))
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
