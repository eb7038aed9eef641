"""Train the shapes model: stage 1 the VAE, stage 2 the DiT (with the text encoder) by flow
matching on the VAE's latents; then write the Diffusers folder `<out>/model`.

    python -m fastvideo.training.train --out outputs/shapes-train --minutes 8.5
    python -m fastvideo.training.train --out outputs/shapes-train --minutes 8.5 --resume

Clips come from the training combinations (`shapes_data`), seeded: fresh every VAE step,
from a pool encoded once per session for the DiT (`--latent-pool`).
`--minutes` is this session's budget for both stages; the VAE stage ends after
`--vae-minutes` in total (over all sessions), the DiT takes the rest. A checkpoint
(weights, optimizer states, step counts, generator states) is written every
`--checkpoint-minutes` and at the end; `--resume` continues from it.

The text encoder (UMT5) is trained with the DiT, not frozen: it costs ~1% of a step (a
2-layer encoder on ~12 tokens) and learns embeddings that say which colour word is the
shape's and which the background's, which a random encoder leaves to the DiT to untangle.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fastvideo.training.build_model import Components, build_components, write_pipeline
from fastvideo.training.shapes_data import (
    random_scene,
    render_batch,
    split_combinations,
    to_model_input,
)
from fastvideo.training.tiny_config import ModelConfig, preset

logger = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
MODEL = "model"


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    out: str
    """Folder for the checkpoint, the loss log and the finished model (`<out>/model`)."""
    model: str = "demo"
    """Size preset of `tiny_config` ("demo" ships, "cpu" runs on a CPU in seconds)."""
    minutes: float = 8.5
    """This session's wall-clock budget, both stages, export excluded."""
    vae_minutes: float = 5.0
    """Stage 1's budget over all sessions (on an H200 the VAE's colours were the last thing
    it learned: 4 minutes left its loss still falling fast)."""
    vae_steps: int | None = None
    """Stop stage 1 after this many steps in total (tests, exact reruns); None: by time."""
    dit_steps: int | None = None
    height: int = 64
    width: int = 64
    num_frames: int = 17
    vae_batch_size: int = 16
    dit_batch_size: int = 256
    """A step of this 9 M-parameter DiT is launch-bound on a GPU (17.6 GFLOP per clip,
    forward and backward: batch 64 ran 10.5 steps/s on an H200, ~12 TFLOP/s), so a larger
    batch is nearly free."""
    vae_lr: float = 1e-3
    dit_lr: float = 5e-4
    warmup_steps: int = 100
    kl_weight: float = 1e-6
    """Keeps the latents' means bounded (the KL's variance part is unused: training
    decodes the posterior's mode)."""
    shape_weight: float = 4.0
    """Extra weight of the shape's pixels in the VAE's reconstruction loss."""
    caption_dropout: float = 0.1
    """Share of clips trained with the empty caption, the unconditional branch of CFG
    (the engine encodes a missing negative prompt as "")."""
    max_sequence_length: int = 512
    """Captions are zero-padded to this, as the engine does at inference (the padded rows
    take part in cross-attention, so the length must match the sampling default)."""
    latent_pool: int = 32768
    """Stage 2 trains on this many clips encoded once per session (~1.3 GB of latents at
    64x64x17); 0: render and encode fresh clips every step."""
    ema_decay: float = 0.999
    held_out_fraction: float = 0.1
    split_seed: int = 0
    """Seeds the held-out split apart from `seed`, so runs with other seeds hold out the
    same combinations (and `evaluate`'s defaults match)."""
    seed: int = 0
    checkpoint_minutes: float = 2.0
    log_every: int = 50
    device: str = "cuda" if torch.cuda.is_available() else "cpu"

    def __post_init__(self) -> None:
        if (self.num_frames - 1) % 4:
            raise ValueError(f"num_frames {self.num_frames} must be 4k + 1 (the VAE halves "
                             f"time twice after the first frame)")
        if self.height % 8 or self.width % 8:
            raise ValueError(f"height x width {self.height}x{self.width}: use multiples of 8 "
                             f"(VAE 4x, then the DiT's 2x2 patches)")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout {self.caption_dropout} must be in [0, 1)")
        if self.latent_pool < 0:
            raise ValueError(f"latent_pool {self.latent_pool} must be >= 0")
        if self.minutes <= 0:
            raise ValueError(f"minutes {self.minutes} must be positive")


@dataclass
class Progress:
    steps: dict[str, int] = dataclasses.field(default_factory=lambda: {"vae": 0, "dit": 0})
    seconds: dict[str, float] = dataclasses.field(default_factory=lambda: {"vae": 0.0, "dit": 0.0})
    latents_mean: list[float] | None = None
    """Per-channel statistics of the trained VAE's latents; set when stage 1 ends."""
    latents_std: list[float] | None = None


class Trainer:
    """Holds the models, optimizers and generators; `run()` trains one session."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.model_config: ModelConfig = preset(config.model)
        self.device = torch.device(config.device)
        self.out = Path(config.out)
        self.components: Components = build_components(self.model_config, config.seed)
        for name in ("vae", "transformer", "text_encoder"):
            getattr(self.components, name).to(self.device).train()
        self.conditioned = torch.nn.ModuleDict({"transformer": self.components.transformer,
                                                "text_encoder": self.components.text_encoder})
        self.ema = [p.detach().clone() for p in self.conditioned.parameters()]
        self.vae_optimizer = torch.optim.AdamW(self.components.vae.parameters(),
                                               lr=config.vae_lr, weight_decay=0.0)
        self.dit_optimizer = torch.optim.AdamW(self.conditioned.parameters(), lr=config.dit_lr,
                                               weight_decay=0.01)
        self.combinations, _ = split_combinations(config.held_out_fraction,
                                                  seed=config.split_seed)
        self.rng = random.Random(config.seed)
        self.generator = torch.Generator(self.device).manual_seed(config.seed)
        self.progress = Progress()
        self.losses: dict[str, list[float]] = {"vae": [], "dit": []}
        self.pool: tuple[torch.Tensor, list[str]] | None = None
        """Stage 2's encoded clips and captions (`latent_pool`)."""

    # ---- data -------------------------------------------------------------------------

    def _clips(self, batch_size: int, rng: random.Random) -> tuple[torch.Tensor, list[str]]:
        """`[B, 3, T, H, W]` in [-1, 1] and their captions."""
        c = self.config
        scenes = [random_scene(rng, self.combinations) for _ in range(batch_size)]
        video = render_batch(scenes, c.num_frames, c.height, c.width, self.device)
        return to_model_input(video), [s.caption() for s in scenes]

    @torch.no_grad()
    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """Clips -> the DiT's latents (the VAE's mode, normalised per channel)."""
        p = self.progress
        mean = torch.tensor(p.latents_mean, device=self.device).view(1, -1, 1, 1, 1)
        std = torch.tensor(p.latents_std, device=self.device).view(1, -1, 1, 1, 1)
        with self._autocast():
            latents = self.components.vae.encode(x).latent_dist.mode()
        return (latents.float() - mean) / std

    @torch.no_grad()
    def _build_pool(self) -> None:
        """Encode `latent_pool` clips once, so a DiT step neither renders nor runs the VAE
        (by FLOPs at 64x64x17, about what the DiT's own step costs). Drawn from their own
        seeded generator: a resumed run rebuilds the same pool."""
        c = self.config
        rng = random.Random(c.seed + 1)
        latents, captions = [], []
        for start in range(0, c.latent_pool, c.dit_batch_size):
            x, batch_captions = self._clips(min(c.dit_batch_size, c.latent_pool - start), rng)
            latents.append(self._encode(x))
            captions += batch_captions
        self.pool = (torch.cat(latents), captions)
        logger.info("encoded a pool of %d clips", len(captions))

    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        """What the engine's text stage gives: each caption's states, zero past its length,
        zero-padded to `max_sequence_length` (encoding at the batch's longest length is the
        same: padded tokens are masked out of attention)."""
        tokens = self.components.tokenizer(list(captions), padding="longest",
                                           return_attention_mask=True, return_tensors="pt")
        mask = tokens.attention_mask.to(self.device)
        hidden = self.components.text_encoder(tokens.input_ids.to(self.device),
                                              mask).last_hidden_state
        hidden = hidden * mask[..., None]
        return F.pad(hidden, (0, 0, 0, self.config.max_sequence_length - hidden.shape[1]))

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.device.type == "cuda")

    def _lr(self, base: float, step: int) -> float:
        return base * min(1.0, (step + 1) / max(1, self.config.warmup_steps))

    # ---- stage 1: VAE -----------------------------------------------------------------

    def vae_step(self) -> float:
        vae, c = self.components.vae, self.config
        x, _ = self._clips(c.vae_batch_size, self.rng)
        with self._autocast():
            posterior = vae.encode(x).latent_dist
            # The mode, not a sample: the posterior starts with std ~1, which drowns the
            # latents, and with a KL this light it takes long to shrink (seen on a CPU: the
            # loss stalled at predicting the mean colour). The DiT trains on the mode too.
            recon = vae.decode(posterior.mode()).sample
        # The shape is 5-10% of the pixels: unweighted, the VAE learns the background first
        # and the shape late (seen on a CPU: a 3-minute run decoded no shape at all). The
        # corner pixel is always background (shapes keep a margin).
        shape = (x - x[..., :1, :1]).abs().amax(dim=1, keepdim=True) > 0.01
        weight = 1.0 + c.shape_weight * shape.float()
        error = (weight * (recon.float() - x) ** 2).sum() / (weight.sum() * x.shape[1])
        loss = error + c.kl_weight * posterior.kl().mean()
        self._update(self.vae_optimizer, vae.parameters(), loss,
                     self._lr(c.vae_lr, self.progress.steps["vae"]))
        return loss.item()

    @torch.no_grad()
    def _measure_latents(self, num_batches: int = 8) -> None:
        """Per-channel mean and std of the latents, written into the VAE's config: the
        engine normalises with them before the DiT and undoes it before decoding."""
        vae = self.components.vae.eval()
        latents = torch.cat([vae.encode(self._clips(self.config.vae_batch_size, self.rng)[0])
                             .latent_dist.mode() for _ in range(num_batches)])
        dims = [d for d in range(latents.ndim) if d != 1]
        self.progress.latents_mean = latents.mean(dims).tolist()
        self.progress.latents_std = latents.std(dims).clamp_min(1e-3).tolist()
        self._set_latent_stats()

    def _set_latent_stats(self) -> None:
        self.components.vae.register_to_config(latents_mean=self.progress.latents_mean,
                                               latents_std=self.progress.latents_std)
        self.components.vae.eval().requires_grad_(False)

    # ---- stage 2: DiT -----------------------------------------------------------------

    def dit_step(self) -> float:
        c, progress = self.config, self.progress
        if self.pool is None:
            x, captions = self._clips(c.dit_batch_size, self.rng)
            x0 = self._encode(x)
        else:
            pool_latents, pool_captions = self.pool
            index = torch.randint(len(pool_captions), (c.dit_batch_size,), device=self.device,
                                  generator=self.generator)
            x0 = pool_latents[index]
            captions = [pool_captions[i] for i in index.tolist()]
        captions = ["" if self.rng.random() < c.caption_dropout else text for text in captions]
        u = torch.rand(x0.shape[0], device=self.device, generator=self.generator)
        noise = torch.randn(x0.shape, device=self.device, generator=self.generator)
        x_t, timestep, target = flow_pair(x0, noise, shifted_sigma(u, self.model_config.flow_shift))
        with self._autocast():
            text = self.encode_text(captions)
            pred = self.components.transformer(hidden_states=x_t, timestep=timestep,
                                               encoder_hidden_states=text, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), target)
        step = progress.steps["dit"]
        self._update(self.dit_optimizer, self.conditioned.parameters(), loss,
                     self._lr(c.dit_lr, step))
        decay = min(c.ema_decay, (1 + step) / (10 + step))  # short warm-up of the average
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, list(self.conditioned.parameters()), 1 - decay)
        return loss.item()

    @staticmethod
    def _update(optimizer: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter],
                loss: torch.Tensor, lr: float) -> None:
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params), 1.0)
        optimizer.step()

    # ---- the session ------------------------------------------------------------------

    def run(self) -> Path:
        """Train until this session's budget (or the step caps) runs out; export the model
        and return its folder (or, if stage 1 is not finished yet, the checkpoint's path)."""
        c, progress = self.config, self.progress
        self.out.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + 60 * c.minutes
        if progress.latents_mean is None:
            self._stage("vae", self.vae_step, deadline, c.vae_steps, 60 * c.vae_minutes)
            if not (_reached(progress.steps["vae"], c.vae_steps)
                    or progress.seconds["vae"] >= 60 * c.vae_minutes):
                self.save_checkpoint()  # out of session time: stage 1 continues next session
                return self.out / CHECKPOINT
            self._measure_latents()
        if c.latent_pool and not _reached(progress.steps["dit"], c.dit_steps):
            self._build_pool()
        self._stage("dit", self.dit_step, deadline, c.dit_steps, math.inf)
        self.save_checkpoint()
        return self.export()

    def _stage(self, name: str, step_fn: Callable[[], float], deadline: float,
               max_steps: int | None, max_seconds: float) -> None:
        c, progress = self.config, self.progress
        next_checkpoint = time.monotonic() + 60 * c.checkpoint_minutes
        window: list[float] = []
        while (not _reached(progress.steps[name], max_steps) and time.monotonic() < deadline
               and progress.seconds[name] < max_seconds):
            start = time.monotonic()
            loss = step_fn()
            if not math.isfinite(loss):
                raise FloatingPointError(f"{name} loss {loss} at step {progress.steps[name]}")
            progress.steps[name] += 1
            progress.seconds[name] += time.monotonic() - start
            self.losses[name].append(loss)
            window.append(loss)
            if progress.steps[name] % c.log_every == 0:
                self._log(name, sum(window) / len(window))
                window.clear()
            if time.monotonic() >= next_checkpoint and time.monotonic() < deadline:
                self.save_checkpoint()
                next_checkpoint = time.monotonic() + 60 * c.checkpoint_minutes

    def _log(self, stage: str, loss: float) -> None:
        p = self.progress
        rate = p.steps[stage] / max(p.seconds[stage], 1e-9)
        logger.info("%s step %d loss %.4f (%.1f steps/s)", stage, p.steps[stage], loss, rate)
        with open(self.out / "train_log.jsonl", "a") as log:
            log.write(json.dumps({"stage": stage, "step": p.steps[stage], "loss": loss,
                                  "seconds": round(p.seconds[stage], 1)}) + "\n")

    # ---- checkpoint and export --------------------------------------------------------

    def save_checkpoint(self) -> None:
        """Everything a resumed run needs to continue as if never stopped; written to a
        temporary file first so a kill mid-write leaves the previous checkpoint whole."""
        state = {
            "config": dataclasses.asdict(self.config),
            "progress": dataclasses.asdict(self.progress),
            "vae": self.components.vae.state_dict(),
            "conditioned": self.conditioned.state_dict(),
            "ema": self.ema,
            "vae_optimizer": self.vae_optimizer.state_dict(),
            "dit_optimizer": self.dit_optimizer.state_dict(),
            "python_rng": _encode_rng(self.rng.getstate()),
            "torch_rng": self.generator.get_state(),
        }
        path = self.out / CHECKPOINT
        torch.save(state, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)
        logger.info("checkpoint at vae step %d, dit step %d", *self.progress.steps.values())

    def load_checkpoint(self) -> None:
        path = self.out / CHECKPOINT
        if not path.exists():
            raise ValueError(f"--resume: no checkpoint at {path}")
        state = torch.load(path, map_location=self.device, weights_only=True)
        _check_same_run(state["config"], dataclasses.asdict(self.config))
        self.progress = Progress(**state["progress"])
        self.components.vae.load_state_dict(state["vae"])
        self.conditioned.load_state_dict(state["conditioned"])
        with torch.no_grad():
            torch._foreach_copy_(self.ema, state["ema"])
        self.vae_optimizer.load_state_dict(state["vae_optimizer"])
        self.dit_optimizer.load_state_dict(state["dit_optimizer"])
        self.rng.setstate(_decode_rng(state["python_rng"]))
        self.generator.set_state(state["torch_rng"].cpu())
        if self.progress.latents_mean is not None:
            self._set_latent_stats()
        logger.info("resumed at vae step %d, dit step %d", *self.progress.steps.values())

    def export(self) -> Path:
        """`<out>/model`: the VAE, and the EMA of the DiT and text encoder."""
        live = [p.detach().clone() for p in self.conditioned.parameters()]
        with torch.no_grad():
            torch._foreach_copy_(list(self.conditioned.parameters()), self.ema)
            path = write_pipeline(self.out / MODEL, self.components, self.model_config)
            torch._foreach_copy_(list(self.conditioned.parameters()), live)
        # Provenance next to the weights (diffusers ignores other files in the folder).
        (path / "training.json").write_text(json.dumps({
            "config": dataclasses.asdict(self.config),
            "progress": dataclasses.asdict(self.progress),
            "last_losses": {k: v[-self.config.log_every:] for k, v in self.losses.items()},
        }, indent=2))
        logger.info("wrote %s", path)
        return path


def shifted_sigma(u: torch.Tensor, shift: float) -> torch.Tensor:
    """Noise level from u in [0, 1], shifted towards noise as the sampler's sigmas are
    (diffusers' `flow_shift`): more steps where the coarse layout is decided."""
    return shift * u / (1 + (shift - 1) * u)


def flow_pair(x0: torch.Tensor, noise: torch.Tensor,
              sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rectified flow as Wan samples it: (x_t = (1 - sigma) x0 + sigma noise, the DiT's
    timestep 1000 sigma, the target noise - x0), what UniPC's `flow_prediction` expects."""
    s = sigma.view(-1, *[1] * (x0.ndim - 1))
    return (1 - s) * x0 + s * noise, 1000 * sigma, noise - x0


# Settings a resumed run may change: budgets, caps, logging. Anything else would make it a
# different run.
_RESUMABLE_CHANGES = {"minutes", "vae_minutes", "vae_steps", "dit_steps", "checkpoint_minutes",
                      "log_every", "device"}


def _check_same_run(saved: dict, current: dict) -> None:
    changed = {k: (saved.get(k), v) for k, v in current.items()
               if k not in _RESUMABLE_CHANGES and saved.get(k) != v}
    if changed:
        raise ValueError(f"--resume with settings that differ from the checkpoint's "
                         f"(saved, now): {changed}")


def _reached(step: int, max_steps: int | None) -> bool:
    return max_steps is not None and step >= max_steps


def _encode_rng(state: tuple) -> dict:
    # `torch.load(weights_only=True)` takes tensors, not Python's nested RNG tuple.
    version, internal, gauss = state
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss": gauss}


def _decode_rng(state: dict) -> tuple:
    return state["version"], tuple(int(v) for v in state["internal"].tolist()), state["gauss"]


def add_config_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One `--option-name` per field of a config dataclass, typed from its annotation, with
    its default (a field without one is required)."""
    for f in dataclasses.fields(cls):
        kind = {"float": float, "int": int, "str": str}[str(f.type).split(" | ")[0]]
        if f.default is dataclasses.MISSING:
            parser.add_argument("--" + f.name.replace("_", "-"), type=kind, required=True)
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default,
                                help=f"default: {f.default}")


def parse_args(argv: Sequence[str] | None = None) -> tuple[TrainConfig, bool]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_options(parser, TrainConfig)
    parser.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    args = vars(parser.parse_args(argv))
    resume = args.pop("resume")
    return TrainConfig(**args), resume


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config, resume = parse_args(argv)
    trainer = Trainer(config)
    if resume:
        trainer.load_checkpoint()
    trainer.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
