"""A pipeline whose stages do (almost) nothing: what the orchestration costs on its own.

`make_noop_model(folder)` writes a Diffusers-style folder whose `model_index.json` names
`NoopVideoPipeline` and no components; the pipeline's four phases (the same shape as
Wan's: text, latents, a resumable denoise, frames) write tiny tensors, so a bulk run over
it measures tasks, checkpoints, the manifest and the Prefect API, not models. Register the
class in the process that runs the stages (`register_noop_pipeline()`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fastvideo.fastvideo_args import FastVideoArgs, SamplingParam
from fastvideo.forward_batch import ForwardBatch
from fastvideo.pipelines.composed_pipeline_base import ComposedPipelineBase
from fastvideo.pipelines.phases import Phase
from fastvideo.pipelines.stages.base import PipelineStage

FRAME_SIZE = 16


class _Fill(PipelineStage):
    """Sets each of its fields to a small tensor (one row per prompt)."""

    def __init__(self, fields: dict[str, tuple[int, ...]]) -> None:
        self.fields = fields
        self.writes = tuple(fields)
        self.on_step_end = None  # the denoise job sets it; nothing to report per step

    def forward(self, batch: ForwardBatch, fastvideo_args: FastVideoArgs) -> ForwardBatch:
        rows = batch.batch_size
        generator = torch.Generator().manual_seed(batch.seed)
        for name, shape in self.fields.items():
            setattr(batch, name, torch.rand((rows, *shape), generator=generator))
        batch.step_index = batch.num_inference_steps
        return batch


class NoopVideoPipeline(ComposedPipelineBase):
    _required_config_modules: list[str] = []
    phases = (
        Phase(name="encode-text", stages=("text_stage",), writes=("prompt_embeds",),
              request=("prompt",)),
        Phase(name="prepare-latents", stages=("latents_stage",), writes=("latents",),
              request=("seed",)),
        Phase(name="denoise", stages=("denoise_stage",), reads=("prompt_embeds", "latents"),
              writes=("latents",), request=(), denoise=True),
        Phase(name="decode", stages=("decode_stage",), reads=("latents",), writes=("output",),
              request=(), frames="output"),
    )
    default_sampling = SamplingParam(height=FRAME_SIZE, width=FRAME_SIZE, num_frames=1,
                                     num_inference_steps=1, guidance_scale=1.0,
                                     max_sequence_length=4)

    def create_pipeline_stages(self, fastvideo_args: FastVideoArgs) -> None:
        self.add_stage("text_stage", _Fill({"prompt_embeds": (4, 8)}))
        self.add_stage("latents_stage", _Fill({"latents": (4, 1, 2, 2)}))
        self.add_stage("denoise_stage", _Fill({"latents": (4, 1, 2, 2)}))
        self.add_stage("decode_stage", _Fill({"output": (1, FRAME_SIZE, FRAME_SIZE, 3)}))


def register_noop_pipeline() -> None:
    from fastvideo.pipelines.pipeline_registry import register_pipeline

    register_pipeline(NoopVideoPipeline)


def make_noop_model(folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "NoopVideoPipeline",
                                                         "_diffusers_version": "0.0"}))
    return folder
