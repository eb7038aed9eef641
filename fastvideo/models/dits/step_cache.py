"""Skipping a DiT's blocks on steps where their input has barely moved, in the manner of
TeaCache (Liu et al., 2024, "Timestep Embedding Tells: It's Time to Cache for Video
Diffusion Model").

Over a denoising loop, the first block's modulated input (the patch-embedded latents after
its timestep-dependent norm, scale and shift) changes by a relative L1 distance from one
step to the next. Those distances are summed from the last step whose blocks ran; while the
sum stays under the threshold, a step reuses that step's block residual (output of the last
block minus input of the first) instead of running the blocks, and only the cheap parts of
the DiT (embeddings, output head) run.

The denoising stage owns a `StepCache` per loop and decides per step, on the full latents
every rank holds, so every sequence-parallel rank takes the same decision; each guidance
branch (cond, uncond, or both as one batch) keeps its own residual, held as the DiT's
(sharded) tokens are, opaque to the stage. A DiT supports it with two methods:
`step_cache_input(hidden_states, timestep, **context)` (the conditional branch's DiT
context: the modulation may depend on it, HunyuanVideo's on the pooled text and guidance)
and a `step_cache: BranchCache | None` keyword of `forward`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class BranchCache:
    """One guidance branch's residual, and whether this step reuses it."""

    reuse: bool = False
    """Set by the stage before the DiT runs: add `residual` instead of running the blocks."""
    residual: torch.Tensor | None = None
    """Set by the DiT when its blocks ran: their output minus their input."""


@dataclass
class StepCache:
    """One denoising loop's decisions. `decide(step, total, modulated)` before a step's
    forwards; `branch(name)` gives the `BranchCache` to pass to the DiT."""

    threshold: float
    accumulated: float = 0.0
    previous: torch.Tensor | None = None
    branches: dict[str, BranchCache] = field(default_factory=dict)
    computed: int = 0
    skipped: int = 0
    _reuse: bool = False

    def decide(self, step: int, total: int, modulated: torch.Tensor) -> bool:
        """True when `step` may reuse the residuals. The first step of the loop (also after a
        resume: nothing cached yet) and the last step always run the blocks."""
        modulated = modulated.float()
        if self.previous is None or step == total - 1:
            reuse = False
        else:
            change = ((modulated - self.previous).abs().mean()
                      / self.previous.abs().mean().clamp_min(1e-12)).item()
            self.accumulated += change
            reuse = self.accumulated < self.threshold
        if not reuse:
            self.accumulated = 0.0
        self.previous = modulated
        self._reuse = reuse
        return reuse

    def branch(self, name: str) -> BranchCache:
        """The cache of branch `name` for this step; a branch without a residual yet (its
        first step, or guidance just turned off) runs its blocks whatever was decided."""
        entry = self.branches.setdefault(name, BranchCache())
        entry.reuse = self._reuse and entry.residual is not None
        if entry.reuse:
            self.skipped += 1
        else:
            self.computed += 1
        return entry


def check_supported(dit_class: type, threshold: float) -> None:
    """ValueError unless `dit_class` can skip its blocks (has `step_cache_input`)."""
    if not hasattr(dit_class, "step_cache_input"):
        raise ValueError(
            f"step_cache_threshold={threshold} needs a DiT that supports step caching "
            f"(the Wan and HunyuanVideo DiTs); {dit_class.__name__} does not: unset it")
