"""Prompt adherence of a shapes model: generate from training and held-out captions with
the engine (`VideoGenerator`, as any checkpoint) and score the clips (`scorer`).

    python -m fastvideo.training.evaluate --model outputs/shapes-train/model --num-prompts 32
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fastvideo.training.scorer import accuracy
from fastvideo.training.shapes_data import (
    Attributes,
    all_combinations,
    random_scene,
    render_batch,
    split_combinations,
    to_model_input,
)
from fastvideo.training.train import add_config_options

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    num_prompts: int = 32
    """Per split, drawn (seeded) from its combinations."""
    height: int = 64
    width: int = 64
    num_frames: int = 17
    num_inference_steps: int = 20
    guidance_scale: float = 5.0
    max_sequence_length: int = 512
    """Must be what the model was trained with (`TrainConfig.max_sequence_length`)."""
    held_out_fraction: float = 0.1
    """With `split_seed`, must match training's, or "held-out" prompts were seen."""
    split_seed: int = 0
    seed: int = 0
    batch_size: int = 8


def prompts_for(split: str, config: EvalConfig) -> list[Attributes]:
    train, held_out = split_combinations(config.held_out_fraction, seed=config.split_seed)
    choices = {"train": train, "held_out": held_out}
    if split not in choices:
        raise ValueError(f"unknown split {split!r}; use one of {sorted(choices)}")
    rng = random.Random(config.seed)
    return [rng.choice(choices[split]) for _ in range(config.num_prompts)]


def vae_accuracy(model_path: str | Path, config: EvalConfig,
                 device: str = "cpu") -> dict[str, float]:
    """The scorer on the VAE's reconstructions of rendered clips (both splits): what the
    VAE lets through is the most the DiT can reach; below ~99% the VAE is the bottleneck."""
    import torch
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(Path(model_path) / "vae",
                                           torch_dtype=torch.float32).to(device).eval()
    rng = random.Random(config.seed)
    scenes = [random_scene(rng, all_combinations()) for _ in range(config.num_prompts)]
    clips = []
    for start in range(0, len(scenes), config.batch_size):
        batch = scenes[start:start + config.batch_size]
        x = to_model_input(render_batch(batch, config.num_frames, config.height, config.width,
                                        device))
        with torch.no_grad():
            recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
        clips += list(recon.clamp(-1, 1).permute(0, 2, 3, 4, 1).cpu())  # [T, H, W, 3]
    return accuracy(clips, scenes, value_range=(-1.0, 1.0))


def evaluate(model_path: str | Path, config: EvalConfig, device: str = "cpu",
             splits: Sequence[str] = ("train", "held_out")) -> dict[str, dict[str, float]]:
    """Per split, the fraction of clips right on each attribute and on all four."""
    from fastvideo import VideoGenerator

    generator = VideoGenerator.from_pretrained(model_path, device=device)
    report = {}
    for split in splits:
        prompts = prompts_for(split, config)
        clips = []
        for start in range(0, len(prompts), config.batch_size):
            batch = prompts[start:start + config.batch_size]
            results = generator.generate_video(
                [p.caption() for p in batch], height=config.height, width=config.width,
                num_frames=config.num_frames, num_inference_steps=config.num_inference_steps,
                guidance_scale=config.guidance_scale, seed=config.seed + start,
                max_sequence_length=config.max_sequence_length)
            clips += [r.frames for r in results]  # float in [0, 1]
        report[split] = accuracy(clips, prompts, value_range=(0.0, 1.0))
        logger.info("%s: %s", split, report[split])
    return report


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the Diffusers folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--report", help="also write the report here (JSON)")
    add_config_options(parser, EvalConfig)
    args = vars(parser.parse_args(argv))
    model, device, report_path = args.pop("model"), args.pop("device"), args.pop("report")
    config = EvalConfig(**args)
    report = {"vae_reconstruction": vae_accuracy(model, config, device=device),
              **evaluate(model, config, device=device)}
    print(json.dumps(report, indent=2))
    if report_path:
        Path(report_path).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
