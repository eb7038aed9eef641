"""One HunyuanVideo DiT forward: ours against diffusers', same random weights, same process.

    python benchmarks/bench_hunyuan_dit.py --json-out hunyuan.json            # 720p, H200
    python benchmarks/bench_hunyuan_dit.py --shape 544x960x129 --runs ours_compiled,sta
    python benchmarks/bench_hunyuan_dit.py --config tiny --device cpu --dtype fp32 \
        --shape 32x48x9 --text-len 16 --text-valid 7 --runs ours,diffusers,sta   # CPU smoke

The released T2V config (diffusers' defaults: 20 dual-stream + 40 single-stream blocks, 24
heads x 128, guidance-embedded). Diffusers' model is built on the device with random weights
(`make_random_wan.randomize_`); ours gets its state dict through our weight loading, either
in memory (`load_weights`, the default: no 26 GB round trip through the disk) or, with
`--via-folder DIR`, from the folder diffusers' `save_pretrained` writes, through the engine's
loader (`_load_fastvideo_model`).

Runs (`--runs`, in the order given): `ours`, `diffusers` (eager), `ours_compiled` (our
blocks compiled one by one, as the engine does: `compile_repeated_blocks`),
`diffusers_compiled` (diffusers' `compile_repeated_blocks`, or `torch.compile` of the module
with `--diffusers-compile module`), `sta` (ours with sliding tile attention at a window of
~`--sta-density` of the key tiles; on the compiled model when `ours_compiled` is run).
Each model is compiled in place the first time a compiled run needs it; eager runs after
that run under `torch.compiler.set_stance("force_eager")`. The first call of a run is its
warm-up (and compile) and gives its output; `--iters` calls are timed after it (median).
The JSON is rewritten after every run, so a run cut short by a time limit keeps what ended.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from bench_dit import backends_used, time_once  # noqa: E402
from make_random_wan import randomize_  # noqa: E402

from fastvideo.attention.metadata import AttentionMetadata  # noqa: E402
from fastvideo.fastvideo_args import parse_dtype  # noqa: E402
from fastvideo.models.compile import compile_repeated_blocks  # noqa: E402

CONFIGS: dict[str, dict[str, Any]] = {
    # hunyuanvideo-community/HunyuanVideo transformer/config.json (= diffusers' defaults).
    "full": dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128,
                 num_layers=20, num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0,
                 patch_size=2, patch_size_t=1, qk_norm="rms_norm", guidance_embeds=True,
                 text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
                 rope_axes_dim=(16, 56, 56)),
    # tests/models/test_hunyuan_dit.py's: the real patch sizes, 2 dual + 2 single blocks.
    "tiny": dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                 num_layers=2, num_single_layers=2, num_refiner_layers=2, mlp_ratio=2.0,
                 patch_size=2, patch_size_t=1, qk_norm="rms_norm", guidance_embeds=True,
                 text_embed_dim=32, pooled_projection_dim=24, rope_theta=256.0,
                 rope_axes_dim=(4, 6, 6)),
}
RUNS = ("ours_compiled", "diffusers_compiled", "sta", "ours", "diffusers")
# HunyuanVideo's VAE: 8x spatial, 4x temporal (first frame kept) compression.
VAE_SPATIAL, VAE_TEMPORAL = 8, 4
TARGETS = {"ours_compiled_over_diffusers_compiled": 0.85, "sta_over_dense": 0.35}


def parse_shape(text: str) -> tuple[int, int, int]:
    """HEIGHTxWIDTHxFRAMES of the video, e.g. 720x1280x129."""
    height, width, frames = (int(v) for v in text.lower().split("x"))
    if (frames - 1) % VAE_TEMPORAL or height % (2 * VAE_SPATIAL) or width % (2 * VAE_SPATIAL):
        raise argparse.ArgumentTypeError(
            f"{text}: frames must be 4k+1, height and width multiples of {2 * VAE_SPATIAL}")
    return height, width, frames


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="full")
    parser.add_argument("--shape", type=parse_shape, default=(720, 1280, 129),
                        help="HEIGHTxWIDTHxFRAMES of the video (latents 1/8, 1/8, 1/4)")
    parser.add_argument("--text-len", type=int, default=256, help="padded Llama tokens")
    parser.add_argument("--text-valid", type=int, default=120, help="real tokens of the prompt")
    parser.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--runs", default=",".join(RUNS),
                        help=f"comma-separated, run in this order; from {', '.join(RUNS)}")
    parser.add_argument("--iters", type=int, default=2, help="timed calls after the first")
    parser.add_argument("--diffusers-compile", choices=("blocks", "module"), default="blocks",
                        help="diffusers' compile_repeated_blocks, or torch.compile(model)")
    parser.add_argument("--sta-density", type=float, default=0.12,
                        help="STA window: the one whose share of key tiles is closest")
    parser.add_argument("--sta-window", help="t,h,w tiles (instead of --sta-density)")
    parser.add_argument("--sta-tile", default="auto", help="STA tile t,h,w, or auto")
    parser.add_argument("--via-folder", type=Path,
                        help="save diffusers' model here and load ours from it through the "
                             "engine's loader (default: load_weights in memory)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    args.runs = [r for r in args.runs.split(",") if r]
    unknown = sorted(set(args.runs) - set(RUNS))
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from {list(RUNS)}")
    if not 0 < args.text_valid <= args.text_len:
        parser.error("--text-valid must be in 1..--text-len")
    return args


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_ours(cls: type[nn.Module], reference: nn.Module, config: dict[str, Any],
              device: torch.device, dtype: torch.dtype, folder: Path | None,
              registry_name: str, library: str) -> nn.Module:
    """Ours with `reference`'s weights, as the engine loads a component: built on the device,
    the checkpoint tensors through `load_weights`, then cast to the compute dtype. With a
    `folder`, through the engine's loader from what `reference.save_pretrained` writes."""
    if folder is not None:
        from fastvideo.models.loader.component_loader import _load_fastvideo_model
        from fastvideo.models.registry import resolve_model

        reference.save_pretrained(folder)
        return _load_fastvideo_model(resolve_model(registry_name, library), folder,
                                     str(device), dtype)
    with torch.device(device):
        model = cls.from_config(config)
    missing, unexpected = model.load_weights(reference.state_dict().items())
    if missing or unexpected:
        raise RuntimeError(f"weights do not match: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
    model.to_compute_dtype(dtype) if hasattr(model, "to_compute_dtype") else model.to(dtype)
    return model.eval().requires_grad_(False)


def build_models(args: argparse.Namespace, device: torch.device, dtype: torch.dtype
                 ) -> tuple[nn.Module, nn.Module, dict[str, float]]:
    from diffusers import HunyuanVideoTransformer3DModel as DiffusersHunyuan

    from fastvideo.models.dits.hunyuanvideo import HunyuanVideoTransformer3DModel

    config = CONFIGS[args.config]
    seconds: dict[str, float] = {}
    begin = time.perf_counter()
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in `dtype`: 13B parameters are 52 GB in fp32
    try:
        with torch.device(device):
            reference = DiffusersHunyuan(**config).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(default_dtype)
    generator = torch.Generator(device).manual_seed(args.seed)
    randomize_(reference, generator)
    synchronize(device)
    seconds["build_diffusers_s"] = time.perf_counter() - begin
    begin = time.perf_counter()
    with contextlib.ExitStack() as stack:
        folder = None
        if args.via_folder is not None:  # a fresh folder inside it, removed afterwards
            args.via_folder.mkdir(parents=True, exist_ok=True)
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=args.via_folder)))
        ours = load_ours(HunyuanVideoTransformer3DModel, reference, dict(reference.config),
                         device, dtype, folder, "HunyuanVideoTransformer3DModel", "diffusers")
        synchronize(device)
    seconds["load_ours_s"] = time.perf_counter() - begin
    return reference, ours, seconds


def make_inputs(args: argparse.Namespace, device: torch.device, dtype: torch.dtype
                ) -> dict[str, torch.Tensor]:
    config = CONFIGS[args.config]
    height, width, frames = args.shape
    latent_shape = (1, config["in_channels"], (frames - 1) // VAE_TEMPORAL + 1,
                    height // VAE_SPATIAL, width // VAE_SPATIAL)
    generator = torch.Generator(device).manual_seed(args.seed + 1)
    mask = torch.zeros(1, args.text_len, device=device, dtype=dtype)
    mask[:, :args.text_valid] = 1
    return {  # in the DiT's dtype, as both pipelines pass them
        "hidden_states": torch.randn(latent_shape, generator=generator, device=device,
                                     dtype=dtype),
        "timestep": torch.tensor([999.0], device=device, dtype=dtype),
        "encoder_hidden_states": torch.randn(1, args.text_len, config["text_embed_dim"],
                                             generator=generator, device=device, dtype=dtype),
        "encoder_attention_mask": mask,
        "pooled_projections": torch.randn(1, config["pooled_projection_dim"],
                                          generator=generator, device=device, dtype=dtype),
        "guidance": torch.tensor([6.0], device=device, dtype=dtype) * 1000.0,
    }


def window_for_density(grid: tuple[int, int, int], tile: tuple[int, int, int],
                       target: float) -> tuple[int, int, int]:
    """A window whose share of the key tiles is within 10% of `target` (else the closest):
    odd sizes first (centred on the query tile), then the most even share of each axis of
    the tile grid, then the closest share."""
    from fastvideo.attention.backends.sliding_tile import TileLayout

    tiles = TileLayout(grid, tile).tile_grid

    def score(window: tuple[int, ...]) -> tuple[bool, bool, float, float]:
        shares = [w / n for w, n in zip(window, tiles)]
        off = abs(math.prod(shares) / target - 1)
        # An axis the window covers whole is odd enough: nothing to centre on.
        odd = all(w % 2 or w == n for w, n in zip(window, tiles))
        return off > 0.1, not odd, max(shares) - min(shares), off

    return min(itertools.product(*(range(1, n + 1) for n in tiles)), key=score)


@contextlib.contextmanager
def stance(eager: bool) -> Iterator[None]:
    """Compiled modules run eagerly inside (a model compiled in place still times eager)."""
    if not eager:
        yield
        return
    with torch.compiler.set_stance("force_eager"):
        yield


def time_run(fn: Callable[[], torch.Tensor], iters: int, device: torch.device, eager: bool
             ) -> tuple[torch.Tensor, float, list[float], float | None]:
    """(output, seconds of the first call, ms of each timed call, peak GiB)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode(), stance(eager):
        begin = time.perf_counter()
        out = fn().float()
        synchronize(device)
        first_s = time.perf_counter() - begin
        times = [time_once(fn, device) for _ in range(iters)]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return out, first_s, times, peak


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    return {"max_abs": (out - ref).abs().max().item(),
            "rel_l2": ((out - ref).norm() / ref.norm()).item()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), parse_dtype(args.dtype)
    torch.manual_seed(args.seed)
    reference, ours, build_seconds = build_models(args, device, dtype)
    inputs = make_inputs(args, device, dtype)
    grid = tuple(n // p for n, p in zip(inputs["hidden_states"].shape[2:], (1, 2, 2)))
    import diffusers

    result: dict[str, Any] = {
        "config": args.config, "shape_hwf": list(args.shape),
        "latent_shape": list(inputs["hidden_states"].shape), "token_grid": list(grid),
        "video_tokens": math.prod(grid), "text_len": args.text_len,
        "text_valid": args.text_valid, "dtype": str(dtype), "iters": args.iters,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "diffusers_compile": args.diffusers_compile, "via_folder": args.via_folder is not None,
        "runs": args.runs, "targets": TARGETS, **build_seconds,
        "first_call_s": {}, "median_ms": {}, "all_ms": {}, "peak_memory_gib": {},
        "diff_to_diffusers": {}, "attention_backends": {},
    }
    print(f"built in {build_seconds['build_diffusers_s']:.1f} s, ours loaded in "
          f"{build_seconds['load_ours_s']:.1f} s; latents {result['latent_shape']}, "
          f"{result['video_tokens']} video tokens", flush=True)

    def write() -> None:
        if args.json_out:
            args.json_out.write_text(json.dumps(result, indent=2))

    compiled: set[str] = set()

    def ensure_compiled(name: str) -> None:
        if name in compiled:
            return
        if name == "ours":
            compile_repeated_blocks(ours, dtype=dtype)
        elif args.diffusers_compile == "blocks":
            reference.compile_repeated_blocks(fullgraph=False, dynamic=False)
        else:
            reference.compile(fullgraph=False, dynamic=False)
        compiled.add(name)

    ours_fn = lambda **extra: ours(**inputs, **extra)  # noqa: E731
    diffusers_fn = lambda: reference(**inputs, return_dict=False)[0]  # noqa: E731
    outputs: dict[str, torch.Tensor] = {}
    for run in args.runs:
        if run == "sta":
            sta_compiled = "ours_compiled" in args.runs
            if sta_compiled:
                ensure_compiled("ours")
            result["sta"] = run_sta(ours, ours_fn, args, grid, device, sta_compiled, outputs)
            outputs["sta"] = result["sta"].pop("_out")
        else:
            model_name, _, mode = run.partition("_")
            if mode:
                ensure_compiled(model_name)
            fn = ours_fn if model_name == "ours" else diffusers_fn
            out, first_s, times, peak = time_run(fn, args.iters, device, eager=not mode)
            outputs[run] = out
            result["first_call_s"][run] = first_s
            result["all_ms"][run] = times
            result["median_ms"][run] = statistics.median(times) if times else first_s * 1e3
            result["peak_memory_gib"][run] = peak
            if model_name == "ours":
                result["attention_backends"][run] = backends_used(ours)
            mem = f", peak {peak:.1f} GiB" if peak is not None else ""
            print(f"{run:>20}: {result['median_ms'][run]:10.1f} ms (first call "
                  f"{first_s:.1f} s){mem}", flush=True)
        summarize(result, outputs)
        write()
    for line in summary_lines(result):
        print(line)
    write()
    return result


def run_sta(model: nn.Module, fn: Callable[..., torch.Tensor], args: argparse.Namespace,
            grid: tuple[int, int, int], device: torch.device, compiled: bool,
            outputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    from fastvideo.attention.backends.sliding_tile import (
        TileLayout,
        block_size_for,
        sta_block_density,
    )
    from fastvideo.attention.layer import request_attention_backend
    from fastvideo.attention.sta_config import STAConfig, resolve_tile_size

    tile = resolve_tile_size(args.sta_tile if args.sta_tile == "auto" else
                             tuple(int(v) for v in args.sta_tile.split(",")), grid)
    window = (tuple(int(v) for v in args.sta_window.split(",")) if args.sta_window
              else window_for_density(grid, tile, args.sta_density))
    layout = TileLayout(grid, tile, block_size=block_size_for(math.prod(tile), device))
    padding = layout.num_tiled_video_tokens / layout.num_video_tokens
    previous = {m: m.requested_backend for m in model.modules()
                if hasattr(m, "requested_backend")}
    request_attention_backend(model, "SLIDING_TILE_ATTN")
    metadata = AttentionMetadata(sta_config=STAConfig(tile_size=tile, default_window=window))
    try:
        out, first_s, times, peak = time_run(lambda: fn(attn_metadata=metadata), args.iters,
                                             device, eager=not compiled)
        backends = backends_used(model)
    finally:
        for layer, backend in previous.items():
            layer.request_backend(backend)
    density = sta_block_density(grid, tile, window)
    entry: dict[str, Any] = {
        "window": list(window), "tile": list(tile), "compiled": compiled,
        "density": density, "computed_fraction": density * padding**2,
        "first_call_s": first_s, "all_ms": times,
        "median_ms": statistics.median(times) if times else first_s * 1e3,
        "peak_memory_gib": peak, "attention_backends": backends, "_out": out,
    }
    dense = outputs.get("ours_compiled" if compiled else "ours")
    if dense is not None:
        entry |= {f"{k}_vs_dense": v for k, v in compare(out, dense).items()}
    print(f"{'sta':>20}: {entry['median_ms']:10.1f} ms (first call {first_s:.1f} s), tile "
          f"{tile} window {window}, density {density:.3f} (computed "
          f"{entry['computed_fraction']:.3f} of dense), {', '.join(backends)}", flush=True)
    return entry


def summarize(result: dict[str, Any], outputs: dict[str, torch.Tensor]) -> None:
    """Differences to diffusers (eager, else compiled) and the ratios, from what has run."""
    ref_name = "diffusers" if "diffusers" in outputs else "diffusers_compiled"
    ms = result["median_ms"]
    if ref_name in outputs:
        ref = outputs[ref_name]
        result["diff_reference"] = ref_name
        result["max_abs_output"] = ref.abs().max().item()
        result["output_finite"] = bool(torch.isfinite(ref).all())
        result["diff_to_diffusers"] = {name: compare(out, ref) for name, out in outputs.items()
                                       if name != ref_name}
    for num, den in (("ours", "diffusers"), ("ours_compiled", "diffusers_compiled"),
                     ("ours_compiled", "diffusers")):
        if num in ms and den in ms:
            result[f"ratio_{num}_over_{den}"] = ms[num] / ms[den]
    sta = result.get("sta")
    if sta:
        dense = "ours_compiled" if sta["compiled"] else "ours"
        if dense in ms:
            result["ratio_sta_over_dense"] = sta["median_ms"] / ms[dense]


def summary_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    for key, value in result.items():
        if key.startswith("ratio_"):
            lines.append(f"{key[6:]}: {value:.3f}")
    for name, diff in result["diff_to_diffusers"].items():
        lines.append(f"{name} vs {result['diff_reference']}: max |diff| {diff['max_abs']:.3e}, "
                     f"rel L2 {diff['rel_l2']:.3e}")
    if "max_abs_output" in result:
        lines.append(f"max |output| {result['max_abs_output']:.3f}")
    return lines


if __name__ == "__main__":
    main()
