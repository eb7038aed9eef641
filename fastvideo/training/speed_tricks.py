"""Speed tricks judged by the shapes model: prompt adherence (the scorer, held-out prompts)
against work, per trick, each an engine or sampling option, off by default:

- fewer steps (`num_inference_steps`),
- guidance that stops after a fraction of the steps (`guidance_end`),
- TeaCache-style step caching (`step_cache_threshold`),
- sliding tile attention windows (`sta_config`): fixed windows, and windows that
  `sta_search` picks by this model's own attention outputs.

    python -m fastvideo.training.speed_tricks --model outputs/shapes-train/model \\
        --num-prompts 32 --report tricks.json

Work is counted per video as DiT block passes (one per branch forward whose blocks ran) and
measured as seconds on this machine; the GPU seconds of the same tricks at 480p come from
`benchmarks/bench_speed_tricks.py`.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastvideo.training.evaluate import EvalConfig, prompts_for
from fastvideo.training.scorer import accuracy
from fastvideo.training.train import add_config_options

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Trick:
    """One row of the table: engine options (`FastVideoArgs`) and sampling options."""

    name: str
    engine: dict[str, Any] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=dict)
    sta_windows: tuple[int, int, int] | str | None = None
    """A window in tiles for every step, layer and head, or "search:<threshold>": the
    windows `sta_search` picks on one calibration video at that error threshold."""
    sta_full_steps: int = 0
    """Steps that attend densely before the windows apply (`STAConfig.num_full_steps`)."""


STA_TILE = (1, 4, 4)
"""Tiles of 16 tokens on the demo's 5 x 8 x 8 token grid (64x64x17): a 5 x 2 x 2 tile grid."""
STA_CANDIDATES = ((3, 1, 1), (5, 1, 1), (3, 2, 2), (5, 2, 2))


def default_tricks() -> list[Trick]:
    return [
        Trick("baseline"),
        Trick("10 steps", sampling={"num_inference_steps": 10}),
        Trick("5 steps", sampling={"num_inference_steps": 5}),
        Trick("guidance for the first 50%", sampling={"guidance_end": 0.5}),
        Trick("guidance for the first 25%", sampling={"guidance_end": 0.25}),
        Trick("step cache 0.05", engine={"step_cache_threshold": 0.05}),
        Trick("step cache 0.1", engine={"step_cache_threshold": 0.1}),
        Trick("step cache 0.2", engine={"step_cache_threshold": 0.2}),
        Trick("step cache 0.4", engine={"step_cache_threshold": 0.4}),
        Trick("STA window (3, 2, 2)", sta_windows=(3, 2, 2)),
        Trick("STA window (3, 1, 1)", sta_windows=(3, 1, 1)),
        # As the 480p setups run it: the first 20% of the steps dense (10 of 50 there).
        Trick("STA window (3, 2, 2), 4 dense steps", sta_windows=(3, 2, 2), sta_full_steps=4),
        Trick("STA window (3, 1, 1), 4 dense steps", sta_windows=(3, 1, 1), sta_full_steps=4),
        Trick("STA by sta_search, error <= 0.1", sta_windows="search:0.1"),
        Trick("STA by sta_search, error <= 0.2, 4 dense steps", sta_windows="search:0.2",
              sta_full_steps=4),
    ]


def sta_config_file(trick: Trick, model_path: str | Path, config: EvalConfig,
                    folder: Path) -> tuple[Path, float]:
    """The trick's STA windows as a config file, and their share of key tiles: the mean over
    all steps (dense ones count 1), layers and heads."""
    from fastvideo.attention.backends.sliding_tile import sta_block_density
    from fastvideo.attention.sta_config import STAConfig
    from fastvideo.entrypoints.sta_search import search_windows_for_model

    grid = ((config.num_frames - 1) // 4 + 1, config.height // 8, config.width // 8)
    if isinstance(trick.sta_windows, tuple):
        sta = STAConfig(tile_size=STA_TILE, default_window=trick.sta_windows,
                        num_full_steps=trick.sta_full_steps)
    else:
        threshold = float(str(trick.sta_windows).removeprefix("search:"))
        calibration = prompts_for("train", config)[0].caption()
        sta = search_windows_for_model(
            model_path, calibration, candidates=STA_CANDIDATES, threshold=threshold,
            tile_size=STA_TILE, num_full_steps=trick.sta_full_steps, height=config.height,
            width=config.width, num_frames=config.num_frames,
            num_inference_steps=config.num_inference_steps,
            guidance_scale=config.guidance_scale, seed=config.seed,
            max_sequence_length=config.max_sequence_length)

    def step_density(step: int) -> float:
        """Mean share of key tiles over the layers and heads of `step` (dense: 1), with
        the windows the backend would use (`head_windows`)."""
        layers = sta.windows.get(step)
        heads_of = ([sta.head_windows(step, layer, len(heads)) for layer, heads in
                     enumerate(layers)] if layers else [sta.head_windows(step, None, 1)])
        shares = [1.0 if heads is None else
                  sum(1.0 if w is None else sta_block_density(grid, STA_TILE, w)
                      for w in heads) / len(heads) for heads in heads_of]
        return sum(shares) / len(shares)

    steps = config.num_inference_steps
    path = sta.save(folder / f"sta-{abs(hash(trick.name))}.json")
    return path, sum(step_density(step) for step in range(steps)) / steps


def judge(model_path: str | Path, tricks: Sequence[Trick], config: EvalConfig,
          device: str = "cpu", split: str = "held_out") -> list[dict[str, Any]]:
    """Per trick: accuracy on `split`'s prompts, DiT block passes and seconds per video."""
    from fastvideo import VideoGenerator

    prompts = prompts_for(split, config)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for trick in tricks:
            engine = dict(trick.engine)
            density = None
            if trick.sta_windows is not None:
                path, density = sta_config_file(trick, model_path, config, Path(tmp))
                engine["sta_config"] = str(path)
            generator = VideoGenerator.from_pretrained(model_path, device=device, **engine)
            passes: list[int] = []
            # Loaded modules may be shared between generators of one model: count, then remove.
            first_block = generator.pipeline.get_module("transformer").blocks[0]
            hook = first_block.register_forward_pre_hook(
                lambda module, args, passes=passes: passes.append(args[0].shape[0]))
            sampling = {"height": config.height, "width": config.width,
                        "num_frames": config.num_frames,
                        "num_inference_steps": config.num_inference_steps,
                        "guidance_scale": config.guidance_scale,
                        "max_sequence_length": config.max_sequence_length, **trick.sampling}
            if not rows:  # the first generation of a process pays one-off costs
                generator.generate_video(prompts[0].caption(), seed=config.seed,
                                         **{**sampling, "num_inference_steps": 1})
                passes.clear()
            clips, seconds = [], 0.0
            for start in range(0, len(prompts), config.batch_size):
                batch = prompts[start:start + config.batch_size]
                begin = time.perf_counter()
                results = generator.generate_video([p.caption() for p in batch],
                                                   seed=config.seed + start, **sampling)
                seconds += time.perf_counter() - begin
                clips += [r.frames for r in results]
            hook.remove()
            generator.shutdown()
            score = accuracy(clips, prompts, value_range=(0.0, 1.0))
            row = {"trick": trick.name, "engine": trick.engine, "sampling": trick.sampling,
                   "accuracy": score, "block_passes_per_video": sum(passes) / len(prompts),
                   "seconds_per_video": seconds / len(prompts), "sta_density": density}
            logger.info("%s: %s", trick.name, row)
            rows.append(row)
    base = rows[0]["block_passes_per_video"] if rows else 0
    for row in rows:
        row["work_vs_first"] = row["block_passes_per_video"] / base if base else None
    return rows


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The table as RESULTS.md shows it."""
    lines = ["| trick | all four right | colour | shape | direction | background | "
             "DiT block passes / video | of the first row | attention density | CPU s / video |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        acc = row["accuracy"]
        density = "" if row["sta_density"] is None else f"{row['sta_density']:.2f}"
        lines.append(
            f"| {row['trick']} | {acc['all']:.0%} | {acc['colour']:.0%} | {acc['shape']:.0%} | "
            f"{acc['direction']:.0%} | {acc['background']:.0%} | "
            f"{row['block_passes_per_video']:.1f} | {row['work_vs_first']:.2f} | {density} | "
            f"{row['seconds_per_video']:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the Diffusers folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--split", default="held_out", choices=("held_out", "train"))
    parser.add_argument("--only", action="append", metavar="NAME",
                        help="run this trick only, by its full name; repeat for several "
                             "(default: all)")
    parser.add_argument("--report", help="also write the rows here (JSON)")
    add_config_options(parser, EvalConfig)
    args = vars(parser.parse_args(argv))
    model, device, split = args.pop("model"), args.pop("device"), args.pop("split")
    only, report = args.pop("only"), args.pop("report")
    tricks = default_tricks()
    if only:
        wanted = [name.strip() for name in only]
        known = {t.name for t in tricks}
        unknown = [name for name in wanted if name not in known]
        if unknown:
            parser.error(f"unknown tricks {unknown}; known: {sorted(known)}")
        tricks = [t for t in tricks if t.name in wanted]
    rows = judge(model, tricks, EvalConfig(**args), device=device, split=split)
    print(markdown(rows))
    if report:
        Path(report).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
