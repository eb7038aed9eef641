"""How pixels map to latents and latents to DiT tokens, read from the model configs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def _config_value(config: Any, key: str) -> Any:
    value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
    if value is None:
        raise ValueError(f"model config has no {key!r}; cannot derive the latent shape")
    return value


@dataclass(frozen=True)
class LatentGeometry:
    spatial_factor: int
    temporal_factor: int
    latent_channels: int
    patch_size: tuple[int, int, int]

    @classmethod
    def from_configs(cls, vae_config: Any, transformer_config: Any) -> LatentGeometry:
        return cls(
            spatial_factor=int(_config_value(vae_config, "scale_factor_spatial")),
            temporal_factor=int(_config_value(vae_config, "scale_factor_temporal")),
            latent_channels=int(_config_value(vae_config, "z_dim")),
            patch_size=tuple(_config_value(transformer_config, "patch_size")),
        )

    @property
    def height_multiple(self) -> int:
        return self.spatial_factor * self.patch_size[1]

    @property
    def width_multiple(self) -> int:
        return self.spatial_factor * self.patch_size[2]

    def validate(self, height: int, width: int, num_frames: int) -> None:
        """Raise `ValueError` saying what is allowed when the video size does not fit."""
        if height % self.height_multiple:
            raise ValueError(
                f"height={height} must be a multiple of {self.height_multiple} "
                f"(VAE spatial factor {self.spatial_factor} x patch size {self.patch_size[1]})")
        if width % self.width_multiple:
            raise ValueError(
                f"width={width} must be a multiple of {self.width_multiple} "
                f"(VAE spatial factor {self.spatial_factor} x patch size {self.patch_size[2]})")
        t = self.temporal_factor
        if num_frames < 1 or (num_frames - 1) % t:
            lower = max(1, (num_frames - 1) // t * t + 1)
            raise ValueError(
                f"num_frames={num_frames} must be of the form k*{t}+1 "
                f"(VAE temporal factor {t}), e.g. {lower} or {lower + t}")

    def latent_shape(self, batch_size: int, height: int, width: int,
                     num_frames: int) -> tuple[int, int, int, int, int]:
        return (batch_size, self.latent_channels, (num_frames - 1) // self.temporal_factor + 1,
                height // self.spatial_factor, width // self.spatial_factor)
