"""The step-cache check both DiTs' sequence-parallel tests run."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def step_cache_outputs(model: nn.Module, inputs: dict[str, Any]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """A computed step (storing the residual of this rank's video tokens), then a step at
    another timestep that reuses it."""
    from fastvideo.models.dits.step_cache import BranchCache

    cache = BranchCache()
    with torch.no_grad():
        first = model(**inputs, step_cache=cache)
        cache.reuse = True
        second = model(**{**inputs, "timestep": inputs["timestep"] * 0.5}, step_cache=cache)
    return first, second
