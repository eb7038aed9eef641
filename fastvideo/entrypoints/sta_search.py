"""Searches Sliding Tile Attention windows per (step, layer, head) on a calibration run.

The DiT runs with full attention. At every self-attention call each candidate window is
also tried (all heads at once) and its per-head relative L2 error against the dense output
is recorded (the worst over calls of the same step, e.g. the two passes of CFG). Each head
then gets the smallest candidate (fewest tile pairs on the calibration grid) whose error is
below the threshold, or dense attention when none is. The dense output is what the model
goes on with, so later steps see the full-attention trajectory.

The model is not edited: the search overrides `get_impl` on each `DistributedAttention`
instance (layer index = its position among them; for Wan, the block index) with full
attention (SDPA) that records, and reads the latent grid and the step from a forward
pre-hook on the DiT (a step is a distinct timestep).

    python -m fastvideo.entrypoints.sta_search --model-path CKPT --prompt "a cat walks" \
        --candidates 3,3,3 5,3,5 5,4,7 --threshold 0.05 --num-full-steps 10 --output sta.json
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastvideo.attention.backends.sdpa import SDPAImpl
from fastvideo.attention.backends.sliding_tile import (
    Grid,
    sliding_tile_attention,
    sta_block_density,
)
from fastvideo.attention.layer import DistributedAttention
from fastvideo.attention.metadata import AttentionMetadata
from fastvideo.attention.sta_config import STAConfig, Window, parse_window, resolve_tile_size
from fastvideo.distributed.parallel_state import get_sp_world_size


@dataclass
class _Calibration:
    """Errors seen so far: (step, layer) -> `[num_candidates, num_heads]`, worst over calls."""

    candidates: tuple[Window, ...]
    tile_size: Window | str
    """"auto" until the grid is known, then `choose_tile_size(grid)`."""
    num_full_steps: int
    grid: Grid | None = None
    step: int = 0
    timesteps: dict[float, int] = field(default_factory=dict)
    errors: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)

    def on_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        latents = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[2]
        patch = module.config.patch_size
        grid = tuple(n // p for n, p in zip(latents.shape[2:], patch))
        if self.grid is not None and grid != self.grid:
            raise ValueError(f"calibrate on one latent shape: saw grid {self.grid}, then {grid}")
        self.grid = grid
        self.tile_size = resolve_tile_size(self.tile_size, grid)
        self.step = self.timesteps.setdefault(float(timestep.flatten()[0]), len(self.timesteps))

    @torch.no_grad()
    def record(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               dense: torch.Tensor, scale: float | None) -> None:
        assert self.grid is not None, "the DiT's forward pre-hook sets the grid"
        num_text = query.shape[1] - math.prod(self.grid)
        ref = dense.float()
        ref_norm = ref.square().sum(dim=(0, 1, 3)).sqrt()
        errors = torch.stack([
            (sliding_tile_attention(query, key, value, grid=self.grid, tile_size=self.tile_size,
                                    windows=window, num_text_tokens=num_text, scale=scale)
             .float() - ref).square().sum(dim=(0, 1, 3)).sqrt() / ref_norm
            for window in self.candidates]).cpu()
        worst = self.errors.get((self.step, layer))
        self.errors[(self.step, layer)] = errors if worst is None else torch.maximum(worst, errors)


class _CalibrationImpl(SDPAImpl):
    """Full attention (SDPA, whatever backend the layer would pick) that also records the
    candidates' errors against its output."""

    def __init__(self, layer: DistributedAttention, index: int,
                 calibration: _Calibration) -> None:
        super().__init__(layer.num_heads, layer.head_size, layer.softmax_scale, layer.causal)
        self.index = index
        self.calibration = calibration

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                metadata: AttentionMetadata | None = None) -> torch.Tensor:
        out = super().forward(query, key, value, metadata)
        if self.calibration.step >= self.calibration.num_full_steps:
            self.calibration.record(self.index, query, key, value, out, self.softmax_scale)
        return out


def search_windows(transformer: nn.Module, run: Callable[[], object], *,
                   candidates: Sequence[Window], threshold: float,
                   tile_size: Window | str = STAConfig.tile_size,
                   num_full_steps: int = 0) -> STAConfig:
    """Run `run()` (a calibration generation or DiT forwards) and return the STA config.

    `transformer` is the DiT that `run` calls; it needs `config.patch_size` and a forward
    taking `hidden_states [B, C, T, H, W]` and `timestep` (as keywords or 1st / 3rd arg).
    `tile_size` "auto" is resolved on the calibration grid; the config names the tile used.
    """
    if not candidates:
        raise ValueError("candidates is empty: give at least one window")
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    if get_sp_world_size() > 1:
        raise ValueError("run the window search in one process (sequence parallel size 1): "
                         "each rank would only see its own heads")
    calibration = _Calibration(
        candidates=tuple(parse_window(w, "candidate") for w in candidates),
        tile_size=tile_size if tile_size == "auto" else parse_window(tile_size, "tile_size"),
        num_full_steps=num_full_steps)
    layers = [m for m in transformer.modules() if isinstance(m, DistributedAttention)]
    if not layers:
        raise ValueError(f"{type(transformer).__name__} has no DistributedAttention to search")
    hook = transformer.register_forward_pre_hook(calibration.on_forward, with_kwargs=True)
    try:
        for index, layer in enumerate(layers):
            impl = _CalibrationImpl(layer, index, calibration)
            layer.get_impl = lambda query, impl=impl: impl
        run()
    finally:
        hook.remove()
        for layer in layers:
            layer.__dict__.pop("get_impl", None)
    return _choose(calibration, len(layers), threshold)


def _choose(calibration: _Calibration, num_layers: int, threshold: float) -> STAConfig:
    if calibration.grid is None:
        raise ValueError("the calibration run never called the DiT")
    order = sorted(range(len(calibration.candidates)), key=lambda i: sta_block_density(
        calibration.grid, calibration.tile_size, calibration.candidates[i]))
    windows: dict[int, list[list[Window | None]]] = {}
    for (step, layer), errors in sorted(calibration.errors.items()):
        heads: list[Window | None] = []
        for head in range(errors.shape[1]):
            fits = [i for i in order if errors[i, head] < threshold]
            heads.append(calibration.candidates[fits[0]] if fits else None)
        windows.setdefault(step, [[] for _ in range(num_layers)])[layer] = heads
    return STAConfig(tile_size=calibration.tile_size,
                     num_full_steps=calibration.num_full_steps, windows=windows)


def search_windows_for_model(model_path: str | Path, prompt: str, *,
                             candidates: Sequence[Window], threshold: float,
                             tile_size: Window | str = STAConfig.tile_size,
                             num_full_steps: int = 0,
                             device: str | None = None, **sampling: Any) -> STAConfig:
    """Load a Diffusers-format model, generate one video for `prompt` (with `sampling`
    options of `VideoGenerator.generate_video`) and search its windows."""
    from fastvideo.entrypoints.video_generator import VideoGenerator

    engine = {} if device is None else {"device": device}
    generator = VideoGenerator.from_pretrained(model_path, **engine)
    transformer = generator.pipeline.get_module("transformer")
    return search_windows(transformer, lambda: generator.generate_video(prompt, **sampling),
                          candidates=candidates, threshold=threshold, tile_size=tile_size,
                          num_full_steps=num_full_steps)


def _window_arg(text: str) -> Window:
    try:
        return parse_window([int(v) for v in text.split(",")], "window")
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None


def _tile_arg(text: str) -> Window | str:
    return text if text == "auto" else _window_arg(text)


def main(argv: Sequence[str] | None = None) -> STAConfig:
    parser = argparse.ArgumentParser(prog="python -m fastvideo.entrypoints.sta_search",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--output", required=True, type=Path, help="config JSON to write")
    parser.add_argument("--candidates", required=True, nargs="+", type=_window_arg,
                        help="windows in tiles as t,h,w, e.g. 3,3,3 5,3,5")
    parser.add_argument("--threshold", required=True, type=float,
                        help="largest relative L2 error of a head's output against dense")
    parser.add_argument("--tile-size", type=_tile_arg, default=STAConfig.tile_size,
                        help='t,h,w, or "auto": the tile that pads the calibration grid least')
    parser.add_argument("--num-full-steps", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--num-frames", type=int, default=81)
    parser.add_argument("--num-inference-steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = search_windows_for_model(
        args.model_path, args.prompt, candidates=args.candidates, threshold=args.threshold,
        tile_size=args.tile_size, num_full_steps=args.num_full_steps, device=args.device,
        height=args.height, width=args.width, num_frames=args.num_frames,
        num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
        seed=args.seed)
    config.save(args.output)
    print(f"wrote {args.output}")
    return config


if __name__ == "__main__":
    main()
