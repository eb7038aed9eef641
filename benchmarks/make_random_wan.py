"""Writes a random-weight Wan2.1-T2V-1.3B checkpoint (Diffusers format) with the real sizes.

    python benchmarks/make_random_wan.py --output /tmp/wan-1.3b-random            # on a GPU
    python benchmarks/make_random_wan.py --output /tmp/wan-small --small --device cpu
    python benchmarks/make_random_wan.py --device meta     # build on `meta`, count params only

GPU benchmarks need the real shapes (so they measure real work) but no machine here can
download the real weights. Like `fastvideo/testing/tiny_wan.py`, each component is built with
its own library's class and saved with its own `save_pretrained`, so the layout is a real
checkpoint's. Modules are built straight on the target device, filled there with random values
(fan-in scaled, norms at 1, so bf16 outputs stay finite: checked on a short input) and saved as
safetensors. `--small` takes the same path with tiny_wan's sizes, for a CPU smoke test.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `fastvideo` (for the tokenizer) without installing the repo

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers (the transformer is benchmarks/bench_dit.py's "1.3b").
FULL_TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
    out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
    cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None,
    added_kv_proj_dim=None, rope_max_seq_len=1024)
# UMT5-XXL's encoder; `feed_forward_proj="gated-gelu"` implies gelu_new and is_gated_act.
FULL_TEXT_ENCODER = dict(
    vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, tie_word_embeddings=False)
FULL_VAE: dict[str, Any] = {}  # AutoencoderKLWan's defaults are Wan2.1's VAE

# tiny_wan's sizes; the text encoder's vocab_size None means "the tokenizer's length".
SMALL_TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
    out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
    rope_max_seq_len=64)
SMALL_TEXT_ENCODER = dict(
    vocab_size=None, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
    relative_attention_num_buckets=8, relative_attention_max_distance=16,
    feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, tie_word_embeddings=False)
SMALL_VAE = dict(
    base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True],
    latents_mean=[0.1 * i for i in range(4)], latents_std=[1.0 + 0.5 * i for i in range(4)],
    scale_factor_spatial=4, scale_factor_temporal=2)

TOKENIZER_VOCAB = 64  # the trained tokenizer's own vocab; the embedding table keeps its rows
MODEL_MAX_LENGTH = 512


@dataclass(frozen=True)
class WanSizes:
    transformer: dict[str, Any]
    text_encoder: dict[str, Any]
    vae: dict[str, Any] = field(default_factory=dict)


FULL = WanSizes(FULL_TRANSFORMER, FULL_TEXT_ENCODER, FULL_VAE)
SMALL = WanSizes(SMALL_TRANSFORMER, SMALL_TEXT_ENCODER, SMALL_VAE)


class Timer:
    """Per-component wall-clock seconds, synchronising the device so GPU work is counted."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.detail: dict[str, dict[str, float]] = {}

    def run(self, component: str, step: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        self.detail.setdefault(component, {})[step] = seconds
        print(f"  {component:<13} {step:<6} {seconds:8.2f} s", flush=True)
        return result

    def totals(self) -> dict[str, float]:
        return {name: sum(steps.values()) for name, steps in self.detail.items()}


@torch.no_grad()
def randomize_(model: nn.Module, generator: torch.Generator | None) -> None:
    """Random weights that keep activations near unit scale: N(0, 1/fan_in) for matrices and
    convolutions, N(0, 0.02) for other vectors, and norms' scales at 1 (shifts at 0)."""
    for module in model.modules():
        # LayerNorm, RMSNorm, FP32LayerNorm, UMT5LayerNorm, WanRMS_norm (`gamma`).
        is_norm = "norm" in type(module).__name__.lower()
        for name, param in module.named_parameters(recurse=False):
            if is_norm:
                param.fill_(0.0 if name in ("bias", "beta") else 1.0)
            elif param.dim() >= 2:
                param.normal_(0.0, param[0].numel() ** -0.5, generator=generator)
            else:
                param.normal_(0.0, 0.02, generator=generator)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


def build_tokenizer() -> Any:
    # Trained locally (nothing can be downloaded): pad 0, eos 1, unk 2, as T5's.
    from fastvideo.testing.tiny_wan import _build_tokenizer

    tokenizer = _build_tokenizer(TOKENIZER_VOCAB)
    tokenizer.model_max_length = MODEL_MAX_LENGTH
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    return tokenizer


def _cast_(model: nn.Module, dtype: torch.dtype, keep_fp32: tuple[str, ...] = ()) -> None:
    # Tensor by tensor rather than `model.to(dtype)`: modules named in `keep_fp32` stay fp32,
    # as diffusers' `from_pretrained(torch_dtype=...)` would keep them.
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in tensors:
        if tensor.is_floating_point() and not set(name.split(".")) & set(keep_fp32):
            tensor.data = tensor.data.to(dtype)


def _on(device: torch.device, build: Callable[[], nn.Module], dtype: torch.dtype,
        keep_fp32: tuple[str, ...] = ()) -> nn.Module:
    # Built directly on the device: no host copy of the weights, and the library's own init
    # (overwritten by `randomize_`) runs as GPU kernels.
    with torch.device(device):
        model = build()
    _cast_(model, dtype, keep_fp32)
    return model.eval().requires_grad_(False)


def build_text_encoder(sizes: dict[str, Any], tokenizer: Any, device: torch.device,
                       dtype: torch.dtype) -> nn.Module:
    from transformers import UMT5Config, UMT5EncoderModel

    sizes = {**sizes, "vocab_size": sizes["vocab_size"] or len(tokenizer)}
    assert sizes["vocab_size"] >= len(tokenizer)
    config = UMT5Config(**sizes, pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    return _on(device, lambda: UMT5EncoderModel(config), dtype)


def build_transformer(sizes: dict[str, Any], device: torch.device,
                      dtype: torch.dtype) -> nn.Module:
    from diffusers import WanTransformer3DModel

    return _on(device, lambda: WanTransformer3DModel(**sizes), dtype,
               tuple(WanTransformer3DModel._keep_in_fp32_modules or ()))


def build_vae(sizes: dict[str, Any], device: torch.device, dtype: torch.dtype) -> nn.Module:
    from diffusers import AutoencoderKLWan

    return _on(device, lambda: AutoencoderKLWan(**sizes), dtype)


def build_scheduler() -> Any:
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                   flow_shift=3.0, num_train_timesteps=1000)


def _assert_finite(name: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise RuntimeError(f"{name}: random weights gave non-finite outputs")


@torch.no_grad()
def check_text_encoder(model: nn.Module, tokenizer: Any) -> None:
    # The pipeline's input: one prompt padded to the full 512 tokens, with the mask.
    tokens = tokenizer(["a cat walks across a sunny garden"], padding="max_length",
                       max_length=MODEL_MAX_LENGTH, truncation=True, return_tensors="pt")
    device = model.get_input_embeddings().weight.device
    out = model(tokens.input_ids.to(device), tokens.attention_mask.to(device)).last_hidden_state
    _assert_finite("text_encoder", out)


@torch.no_grad()
def check_transformer(model: nn.Module) -> None:
    cfg, param = model.config, model.patch_embedding.weight  # fp32 islands aside
    latents = torch.randn(1, cfg.in_channels, 2, 8, 8, device=param.device, dtype=param.dtype)
    text = torch.randn(1, 16, cfg.text_dim, device=param.device, dtype=param.dtype)
    timestep = torch.tensor([500], device=param.device)
    _assert_finite("transformer", model(latents, timestep, text, return_dict=False)[0])


@torch.no_grad()
def check_vae(model: nn.Module) -> None:
    param = next(model.parameters())
    latents = torch.randn(1, model.config.z_dim, 2, 4, 4, device=param.device, dtype=param.dtype)
    _assert_finite("vae", model.decode(latents, return_dict=False)[0])


def make_random_wan(output: Path | None, sizes: WanSizes, device: torch.device,
                    dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> dict[str, Any]:
    """Build, check and save every component; returns timings and parameter counts.

    On the `meta` device the modules are only built (no memory), to count parameters.
    """
    from diffusers import WanPipeline

    real = device.type != "meta"
    generator = torch.Generator(device).manual_seed(seed) if real else None
    timer = Timer(device)
    models: dict[str, Any] = {}

    def component(name: str, build: Callable[[], Any], check: Callable[[Any], None]) -> None:
        model = timer.run(name, "build", build)
        if real and isinstance(model, nn.Module):
            timer.run(name, "fill", lambda: randomize_(model, generator))
            timer.run(name, "check", lambda: check(model))
        if real:
            timer.run(name, "save", lambda: model.save_pretrained(output / name))
        models[name] = model

    if real:
        assert output is not None
        output.mkdir(parents=True, exist_ok=True)
    tokenizer = timer.run("tokenizer", "build", build_tokenizer)
    if real:
        timer.run("tokenizer", "save", lambda: tokenizer.save_pretrained(output / "tokenizer"))
    component("text_encoder", lambda: build_text_encoder(sizes.text_encoder, tokenizer, device,
                                                         dtype),
              lambda m: check_text_encoder(m, tokenizer))
    component("transformer", lambda: build_transformer(sizes.transformer, device, dtype),
              check_transformer)
    # fp32, as Wan's VAE runs (and ships).
    component("vae", lambda: build_vae(sizes.vae, device, torch.float32), check_vae)
    component("scheduler", build_scheduler, lambda s: None)
    if real:
        # model_index.json exactly as `WanPipeline.save_pretrained` writes it (the components
        # are already saved, one timed step each).
        pipe = WanPipeline(tokenizer=tokenizer, **models)
        timer.run("model_index", "save", lambda: pipe.save_config(output))
    params = {name: param_count(m) for name, m in models.items() if isinstance(m, nn.Module)}
    return {"seconds": timer.totals(), "seconds_detail": timer.detail, "params": params,
            "output": str(output) if real else None, "device": str(device)}


def add_video_options(parser: argparse.ArgumentParser) -> None:
    """The whole-video benchmarks' workload options: Wan2.1's 480p preset on this machine's
    device (`--device`, `--height`, `--width`, `--num-frames`, `--steps`,
    `--guidance-scale`)."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--num-frames", type=int, default=81)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=5.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, help="checkpoint folder (created if needed)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda, cpu, or meta (build only and count parameters)")
    parser.add_argument("--small", action="store_true", help="tiny sizes (CPU smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", type=Path, help="write timings and counts as JSON here")
    args = parser.parse_args(argv)
    if args.output is None and args.device != "meta":
        parser.error("--output is required unless --device meta")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    sizes = SMALL if args.small else FULL
    print(f"random Wan2.1-T2V-1.3B ({'small' if args.small else 'full'} sizes) on {device}"
          + (f" -> {args.output}" if device.type != "meta" else ""), flush=True)
    start = time.perf_counter()
    result = make_random_wan(args.output, sizes, device, seed=args.seed)
    result["seconds"]["total"] = time.perf_counter() - start
    for name, count in result["params"].items():
        print(f"  {name:<13} {count:>14,d} params ({count:.3e})")
    print(f"  total {result['seconds']['total']:.2f} s", flush=True)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
