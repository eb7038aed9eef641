"""`ForwardBatch`: the state that pipeline stages pass along.

Every stage reads some fields and writes others (see `PipelineStage.reads` /
`writes`). Tensors live in tensor fields; everything else is plain Python data,
so that the orchestration layer can checkpoint a batch as safetensors (tensors)
plus one parquet row (the rest) without pickling anything.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

NOISE_ROWS_KEY = "noise_rows"
"""`ForwardBatch.extra` key: `[first_row, total_rows]`: the batch is items `first_row...` of
a request of `total_rows` items split across model replicas; its initial noise is those
rows of the whole request's noise, so a video does not depend on the split."""


@dataclass
class ForwardBatch:
    """Inputs, intermediate results and outputs of one pipeline call.

    `prompt` holds B prompts; every per-item tensor's leading dimension is B (with
    classifier-free guidance the DiT may see a doubled batch, conditional and unconditional
    halves, inside the denoising stage; the fields keep B rows).
    """

    # -- request --
    prompt: list[str] | None = None
    negative_prompt: list[str] | None = None
    height: int = 480
    width: int = 832
    num_frames: int = 81
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    seed: int = 0
    max_sequence_length: int = 512
    image: str | None = None
    """Image-to-video: where the first frame comes from (a path or store URI)."""
    embedded_guidance_scale: float | None = None
    """Guidance-distilled DiTs (HunyuanVideo): the guidance the DiT takes as an input."""
    guidance_end: float = 1.0
    """Fraction of the steps guided (classifier-free); the rest run the conditional branch."""
    request_id: str | None = None

    # -- text encoding --
    prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    prompt_attention_mask: torch.Tensor | None = None
    """`[B, L]`, 1 on real tokens: for DiTs that mask their text tokens (HunyuanVideo)."""
    negative_prompt_attention_mask: torch.Tensor | None = None
    pooled_prompt_embeds: torch.Tensor | None = None
    """`[B, D]`, a second encoder's pooled summary of the prompt (HunyuanVideo's CLIP)."""
    negative_pooled_prompt_embeds: torch.Tensor | None = None

    # -- image-to-video conditioning (Wan2.1 I2V) --
    image_pixels: torch.Tensor | None = None
    """The first frame as loaded, `[H, W, 3]` uint8 RGB, one image for every item: read
    from `image`, or set by a caller that was given a PIL image."""
    image_embeds: torch.Tensor | None = None
    """CLIP vision tokens of the image (the penultimate layer), `[B, tokens, image_dim]`."""
    condition_latents: torch.Tensor | None = None
    """The DiT's extra input channels, `[B, temporal_factor + C, T, H, W]` float32: a mask
    (1 on the first latent frame) and the normalised latents of the image followed by
    black frames; concatenated after the noisy latents on channels at every step."""

    # -- timesteps and latents --
    timesteps: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    # Index of the next denoising step to run; > 0 when resuming mid-denoise.
    step_index: int = 0

    # -- outputs --
    output: torch.Tensor | None = None  # decoded frames, [B, T, H, W, 3] float32 in [0, 1]

    # Seconds spent in each stage, keyed by stage name.
    timings: dict[str, float] = field(default_factory=dict)
    # Free-form per-stage data (JSON-serialisable values or tensors only).
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        if self.prompt is None:
            raise ValueError("ForwardBatch.prompt is not set, so the batch size is unknown")
        return len(self.prompt)

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self.guidance_scale > 1.0

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def request_field_names(cls) -> tuple[str, ...]:
        """The request's own fields (`SamplingParam`'s, the prompt and the request id):
        cheap values that every checkpoint keeps, so each checkpoint says what it was
        made for."""
        from fastvideo.fastvideo_args import SamplingParam

        names = ("prompt", *SamplingParam.option_names(), "request_id")
        missing = [n for n in names if n not in cls.field_names()]
        if missing:  # the request schema is SamplingParam; the batch must carry all of it
            raise TypeError(f"ForwardBatch has no field for request options {missing}")
        return names

    @classmethod
    def list_field_names(cls) -> frozenset[str]:
        """Fields that hold one value per item of the batch as a list (prompts)."""
        return frozenset(f.name for f in dataclasses.fields(cls)
                         if str(f.type).startswith("list["))
