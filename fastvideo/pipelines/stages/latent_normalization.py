"""How a family's VAE latents map to the DiT's scale, injected into the stages that cross
that boundary (decoding, image conditioning): Wan normalises per channel with a mean and a
standard deviation, other VAEs with one scaling factor."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LatentNormalization:
    mean: tuple[float, ...]
    std: tuple[float, ...]
    """Per channel; one value each for a single scaling factor (mean 0, std 1/factor)."""

    @classmethod
    def per_channel(cls, mean: Sequence[float], std: Sequence[float]) -> LatentNormalization:
        if len(mean) != len(std):
            raise ValueError(f"latent mean and std differ in length: {len(mean)} vs {len(std)}")
        return cls(tuple(float(m) for m in mean), tuple(float(s) for s in std))

    @classmethod
    def scaling_factor(cls, factor: float) -> LatentNormalization:
        return cls((0.0,), (1.0 / factor,))

    def _stats(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, len(self.mean)) + (1,) * (latents.ndim - 2)
        mean = torch.tensor(self.mean).view(shape).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(self.std).view(shape).to(latents.device, latents.dtype)
        return mean, inv_std

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents -> the DiT's scale."""
        mean, inv_std = self._stats(latents)
        return (latents - mean) * inv_std

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """The DiT's latents -> what the VAE decodes."""
        mean, inv_std = self._stats(latents)
        return latents / inv_std + mean
