"""InputValidationStage: normalise the request and reject what cannot run."""

from __future__ import annotations

import math

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.forward_batch import ForwardBatch
from fastvideo.pipelines.stages.base import PipelineStage
from fastvideo.pipelines.stages.geometry import LatentGeometry


class InputValidationStage(PipelineStage):
    """Turns prompts into lists, broadcasts the negative prompt, checks sizes and numbers."""

    reads = ("prompt",)
    writes = ("prompt",)

    def __init__(self, geometry: LatentGeometry, embedded_guidance: bool = False) -> None:
        self.geometry = geometry
        self.embedded_guidance = embedded_guidance
        """The DiT takes `embedded_guidance_scale`; without it a value given is refused."""

    def forward(self, batch: ForwardBatch, fastvideo_args: FastVideoArgs) -> ForwardBatch:
        batch.prompt = _prompt_list(batch.prompt, "prompt")
        if not batch.prompt:
            raise ValueError("prompt must be a non-empty string or a non-empty list of strings")
        negative = batch.negative_prompt
        if negative is None or isinstance(negative, str):
            negative = [negative or ""] * len(batch.prompt)
        batch.negative_prompt = _prompt_list(negative, "negative_prompt")
        if len(batch.negative_prompt) != len(batch.prompt):
            raise ValueError(
                f"negative_prompt has {len(batch.negative_prompt)} entries but prompt has "
                f"{len(batch.prompt)}; give one negative prompt or one per prompt")
        if not isinstance(batch.num_inference_steps, int) or batch.num_inference_steps < 1:
            raise ValueError(
                f"num_inference_steps must be a positive integer, got {batch.num_inference_steps!r}")
        if not math.isfinite(batch.guidance_scale) or batch.guidance_scale < 0:
            raise ValueError(
                f"guidance_scale must be a finite number >= 0, got {batch.guidance_scale!r}")
        if batch.embedded_guidance_scale is not None and not self.embedded_guidance:
            raise ValueError(
                f"embedded_guidance_scale={batch.embedded_guidance_scale} is for guidance-"
                "distilled DiTs (HunyuanVideo); this model does not take it, use guidance_scale")
        for name in ("height", "width", "num_frames"):
            value = getattr(batch, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.geometry.validate(batch.height, batch.width, batch.num_frames)
        return batch


def _prompt_list(value: object, name: str) -> list[str]:
    prompts = [value] if isinstance(value, str) else value
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{name} must be a string or a list of strings, got {value!r}")
    return list(prompts)
