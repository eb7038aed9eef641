"""Sizes of the small Wan2.1-format shapes model, as the keyword arguments of each
component's own class (diffusers' `WanTransformer3DModel` and `AutoencoderKLWan`,
transformers' `UMT5Config`), so the folder it is saved to loads like any Wan checkpoint.

`demo_model()` is the one trained on a GPU and shipped (~12 M parameters, ~24 MB in bf16);
`cpu_model()` trains a few steps on a CPU in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, kw_only=True)
class DiTSize:
    dim: int = 256
    """Width: `num_heads * head_dim`."""
    head_dim: int = 64
    num_layers: int = 8
    ffn_dim: int = 1024
    freq_dim: int = 256
    """Width of the sinusoidal timestep embedding."""

    def __post_init__(self) -> None:
        if self.dim % self.head_dim:
            raise ValueError(f"DiT dim {self.dim} is not a multiple of head_dim {self.head_dim}")


@dataclass(frozen=True, kw_only=True)
class VAESize:
    base_dim: int = 32
    z_dim: int = 8
    """Latent channels (Wan2.1: 16); the shapes need few."""
    dim_mult: tuple[int, ...] = (1, 2, 2)
    """One spatial 2x downsampling between consecutive entries: 4x here."""
    temporal_downsample: tuple[bool, ...] = (True, True)
    """Per downsampling, whether time halves too: 4x here, as in Wan2.1 (17 frames -> 5)."""

    def __post_init__(self) -> None:
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"temporal_downsample {self.temporal_downsample} needs one entry "
                             f"per downsampling ({len(self.dim_mult) - 1})")

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)


@dataclass(frozen=True, kw_only=True)
class TextSize:
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    d_ff: int = 256
    vocab_size: int = 64
    """Of the tokenizer trained on the captions (the vocabulary has ~25 words)."""


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    dit: DiTSize = field(default_factory=DiTSize)
    vae: VAESize = field(default_factory=VAESize)
    text: TextSize = field(default_factory=TextSize)
    flow_shift: float = 2.0
    """Timestep shift of training and of the UniPC sampler (Wan uses 3.0 at 480p; fewer
    pixels need less)."""
    save_dtype: str = "bfloat16"
    """Dtype of the shipped safetensors; the engine casts to its compute dtype on load."""

    def __post_init__(self) -> None:
        if self.flow_shift <= 0:
            raise ValueError(f"flow_shift {self.flow_shift} must be positive")
        if self.save_dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"save_dtype {self.save_dtype!r}: use bfloat16, float16 or float32")

    def dit_kwargs(self) -> dict[str, Any]:
        d = self.dit
        return dict(patch_size=(1, 2, 2), num_attention_heads=d.dim // d.head_dim,
                    attention_head_dim=d.head_dim, in_channels=self.vae.z_dim,
                    out_channels=self.vae.z_dim, text_dim=self.text.d_model, freq_dim=d.freq_dim,
                    ffn_dim=d.ffn_dim, num_layers=d.num_layers, cross_attn_norm=True,
                    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)

    def vae_kwargs(self) -> dict[str, Any]:
        v = self.vae
        # latents_mean/std are placeholders until measured on encoded clips (train.py).
        return dict(base_dim=v.base_dim, z_dim=v.z_dim, dim_mult=list(v.dim_mult),
                    num_res_blocks=1, temperal_downsample=list(v.temporal_downsample),
                    latents_mean=[0.0] * v.z_dim, latents_std=[1.0] * v.z_dim,
                    scale_factor_spatial=v.spatial_factor,
                    scale_factor_temporal=v.temporal_factor)

    def umt5_kwargs(self, vocab_size: int, pad_token_id: int, eos_token_id: int) -> dict[str, Any]:
        t = self.text
        # No dropout: training stays a function of the seeded generators only.
        return dict(vocab_size=vocab_size, d_model=t.d_model, d_kv=t.d_model // t.num_heads,
                    d_ff=t.d_ff, num_layers=t.num_layers, num_heads=t.num_heads,
                    relative_attention_num_buckets=16, relative_attention_max_distance=32,
                    dropout_rate=0.0, pad_token_id=pad_token_id, eos_token_id=eos_token_id)


def demo_model() -> ModelConfig:
    """The shipped model: ~12 M parameters, ~24 MB of bf16 safetensors."""
    return ModelConfig()


def cpu_model() -> ModelConfig:
    """A few steps on a CPU in seconds; same structure, small widths."""
    return ModelConfig(dit=DiTSize(dim=32, head_dim=16, num_layers=2, ffn_dim=64, freq_dim=32),
                       vae=VAESize(base_dim=8, z_dim=4),
                       text=TextSize(d_model=32, num_layers=1, num_heads=2, d_ff=64))


PRESETS = {"demo": demo_model, "cpu": cpu_model}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]()
