"""Seconds per video of each speed trick at 480p, one GPU, one process: the GPU column of
the table whose accuracy column `python -m fastvideo.training.speed_tricks` measures on the
trained shapes model (docs/attention_and_speed.md, "Speed tricks").

    python benchmarks/bench_speed_tricks.py --json-out tricks.json           # H200, ~8 min
    python benchmarks/bench_speed_tricks.py --smoke --json-out tricks.json   # CPU, tiny model

A random-weight Wan2.1-1.3B (`make_random_wan.py`) at 480x832x81, 50 steps, CFG 5, through
`VideoGenerator` with compiled blocks; one untimed video first (the compile), then one
video per trick, in this process: the baseline, 25 steps,
guidance for the first 50% / 25% of the steps, step caching and STA.

Step caching decides from the model's own trajectory, and random weights do not move like
trained ones, so each `--cache-work` fraction is timed with the blocks run on that share of
the steps, spread evenly (first and last kept): the speed of the work share that the shapes
model's table reports for a threshold.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from make_random_wan import add_video_options  # noqa: E402

from fastvideo.models.dits import step_cache  # noqa: E402

PROMPT = "a red fox running through fresh snow, golden hour"
# STA as in RESULTS.md: window (4, 3, 6) of the auto tile at 480p keeps 25.7% of the keys.
STA_CONFIG = {"tile_size": "auto", "num_full_steps": 10, "default_window": [4, 3, 6]}


def computed_steps(total: int, work: float) -> set[int]:
    """`round(work * total)` steps (at least first and last), spread evenly."""
    count = min(total, max(2, round(work * total)))
    return {round(i * (total - 1) / (count - 1)) for i in range(count)}


@contextmanager
def forced_schedule(work: float, total: int) -> Iterator[None]:
    """Step caching that runs the blocks on `computed_steps(total, work)` only."""
    keep = computed_steps(total, work)
    original = step_cache.StepCache.decide

    def decide(self: step_cache.StepCache, step: int, total_: int,
               modulated: torch.Tensor) -> bool:
        self._reuse = step not in keep
        return self._reuse

    step_cache.StepCache.decide = decide
    try:
        yield
    finally:
        step_cache.StepCache.decide = original


def time_video(generator: Any, sampling: dict[str, Any], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    begin = time.perf_counter()
    generator.generate_video(PROMPT, seed=0, **sampling)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - begin


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", type=Path,
                        help="a Wan checkpoint (default: a random 1.3B built here)")
    add_video_options(parser)
    parser.add_argument("--cache-work", default="0.7,0.5",
                        help="comma-separated shares of the steps whose blocks run")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU smoke test: tiny model, 32x48x5, 4 steps, no compile")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    if args.smoke:
        args.height, args.width, args.num_frames, args.steps = 32, 48, 5, 4
        args.no_compile = True
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from fastvideo import VideoGenerator

    args = parse_args(argv)
    result: dict[str, Any] = {"device": (torch.cuda.get_device_name() if
                                         args.device.startswith("cuda") else "cpu"),
                              "shape_hwf": [args.height, args.width, args.num_frames],
                              "steps": args.steps, "guidance_scale": args.guidance_scale,
                              "compiled": not args.no_compile, "seconds": {}}

    def save() -> None:
        if args.json_out:
            args.json_out.write_text(json.dumps(result, indent=2))

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model_path
        if model is None:
            from make_random_wan import FULL, SMALL, make_random_wan

            model = Path(tmp) / "wan"
            make_random_wan(model, SMALL if args.smoke else FULL, torch.device(args.device))
        sta_file = Path(tmp) / "sta.json"
        sta = dict(STA_CONFIG)
        if args.smoke:  # the tiny grid: a window it has
            sta.update(num_full_steps=1, default_window=[1, 2, 2])
        sta_file.write_text(json.dumps(sta))
        base = {"height": args.height, "width": args.width, "num_frames": args.num_frames,
                "num_inference_steps": args.steps, "guidance_scale": args.guidance_scale}
        engine = {"device": args.device, "enable_torch_compile": not args.no_compile}
        runs: list[tuple[str, dict[str, Any], dict[str, Any], float | None]] = [
            ("baseline", {}, {}, None),
            (f"{args.steps // 2} steps", {}, {"num_inference_steps": args.steps // 2}, None),
            ("guidance for the first 50%", {}, {"guidance_end": 0.5}, None),
            ("guidance for the first 25%", {}, {"guidance_end": 0.25}, None),
            *((f"step cache, blocks on {float(w):.0%} of the steps",
               {"step_cache_threshold": 1.0}, {}, float(w))
              for w in args.cache_work.split(",") if w),
        ]
        generator = VideoGenerator.from_pretrained(str(model), **engine)
        cached = VideoGenerator.from_pretrained(str(model), step_cache_threshold=1.0, **engine)
        result["warmup_s"] = time_video(generator, base, args.device)
        # Steps past `guidance_end` run the conditional branch alone, a batch of 1 where
        # batch_cfg runs 2: its own compile, paid here (a first run measured 72 s for the
        # 50% row, ~40 s of it this compile).
        result["warmup_guidance_end_s"] = time_video(
            generator, {**base, "num_inference_steps": 2, "guidance_end": 0.5}, args.device)
        # The second model compiles too (its own blocks): a short video does it.
        result["warmup_cached_s"] = time_video(cached, {**base, "num_inference_steps": 2},
                                               args.device)
        print(f"warm-up (compile) {result['warmup_s']:.1f} s, "
              f"{result['warmup_guidance_end_s']:.1f} s, {result['warmup_cached_s']:.1f} s",
              flush=True)
        for name, options, sampling, work in runs:
            target = cached if options else generator
            if work is None:
                seconds = time_video(target, {**base, **sampling}, args.device)
            else:
                with forced_schedule(work, args.steps):
                    seconds = time_video(target, {**base, **sampling}, args.device)
            result["seconds"][name] = seconds
            print(f"{name:>40}: {seconds:7.2f} s", flush=True)
            save()
        generator.shutdown()
        cached.shutdown()
        sta_gen = VideoGenerator.from_pretrained(str(model), sta_config=str(sta_file), **engine)
        result["sta_warmup_s"] = time_video(sta_gen, base, args.device)
        name = f"STA window {tuple(sta['default_window'])}, {sta['num_full_steps']} dense steps"
        result["seconds"][name] = time_video(sta_gen, base, args.device)
        print(f"{name:>40}: {result['seconds'][name]:7.2f} s", flush=True)
        sta_gen.shutdown()
    baseline = result["seconds"]["baseline"]
    result["vs_baseline"] = {k: v / baseline for k, v in result["seconds"].items()}
    save()
    return result


if __name__ == "__main__":
    main()
