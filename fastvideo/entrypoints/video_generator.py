"""`VideoGenerator`: the Python API. Load a model once, generate many videos."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastvideo.fastvideo_args import FastVideoArgs, SamplingParam
from fastvideo.forward_batch import ForwardBatch
from fastvideo.pipelines.builder import pipeline_class
from fastvideo.pipelines.composed_pipeline_base import ComposedPipelineBase
from fastvideo.utils.image_io import ImageSource, image_to_pixels, load_image
from fastvideo.utils.video_io import video_file_name, write_mp4

logger = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    """One generated video."""

    prompt: str
    seed: int
    frames: torch.Tensor
    """`[num_frames, height, width, 3]` float32 in [0, 1]."""
    latents: torch.Tensor
    """Final denoised latents `[C, T, H, W]`, before the VAE's de-normalisation."""
    video_path: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per stage (shared by all videos generated in the same call)."""


class VideoGenerator:
    """Generates videos from prompts with a pipeline loaded once.

    With `num_gpus == 1` the pipeline runs in this process. With more, N worker
    processes (one per GPU; CPU processes on gloo without GPUs) each load it and run
    every call together; `shutdown()` (or leaving a `with` block) stops them.
    """

    def __init__(self, fastvideo_args: FastVideoArgs,
                 pipeline: ComposedPipelineBase | None = None) -> None:
        self.fastvideo_args = fastvideo_args
        self.pipeline = pipeline
        self.executor = None
        self.pipeline_class = (type(pipeline) if pipeline is not None else
                               pipeline_class(fastvideo_args.model_path,
                                              fastvideo_args.pipeline_name))
        if pipeline is None:
            start = time.perf_counter()
            if fastvideo_args.num_gpus > 1:
                from fastvideo.worker.multiproc_executor import MultiprocExecutor

                self.executor = MultiprocExecutor(fastvideo_args)
            else:  # the process's engine: a second generator of the same model shares it
                from fastvideo.jobs.engine import ENGINE

                self.pipeline = ENGINE.pipeline(fastvideo_args)
            logger.info("loaded %s on %d process(es) in %.1f s", fastvideo_args.model_path,
                        fastvideo_args.num_gpus, time.perf_counter() - start)

    @classmethod
    def from_pretrained(cls, model_path: str | Path, **engine_options: Any) -> VideoGenerator:
        """Load a Diffusers-format model; `engine_options` are `FastVideoArgs` fields."""
        return cls(FastVideoArgs(model_path=str(model_path), **engine_options))

    def _forward(self, batch: ForwardBatch) -> ForwardBatch:
        if self.executor is not None:
            return self.executor.forward(batch)
        return self.pipeline.forward(batch, self.fastvideo_args)

    def shutdown(self) -> None:
        if self.executor is not None:
            self.executor.shutdown()
            self.executor = None

    def __enter__(self) -> VideoGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def generate_video(self, prompt: str | list[str], negative_prompt: str | None = None,
                       output_path: str | Path | None = None, fps: int | None = None,
                       image: ImageSource | None = None,
                       **sampling: Any) -> GenerationResult | list[GenerationResult]:
        """Generate one video per prompt.

        `sampling` takes the `SamplingParam` fields (height, width, num_frames,
        num_inference_steps, guidance_scale, seed, max_sequence_length,
        embedded_guidance_scale, guidance_end); those not given,
        and `fps`, are the model family's defaults (`pipeline_class.default_sampling`). An image-to-video
        model needs `image`, the first frame of every video: a PIL image, a local path or a
        store URI (`s3://bucket/a.png`); other models refuse one. With `output_path` (a
        folder, or a `.mp4` path for a single prompt) each video is also written as mp4. A
        single prompt returns one result, a list returns a list.
        """
        unknown = set(sampling) - set(SamplingParam.option_names())
        if unknown:
            raise ValueError(
                f"unknown sampling options {sorted(unknown)}; known: {list(SamplingParam.option_names())}")
        self.pipeline_class.check_image_given(image)
        image_ref = str(image) if isinstance(image, (str, Path)) else None
        # What the request leaves unset, the model family's defaults fill in.
        params = dataclasses.replace(self.pipeline_class.default_sampling,
                                     negative_prompt=negative_prompt, image=image_ref, **sampling)
        batch = ForwardBatch(
            prompt=prompt, negative_prompt=params.negative_prompt, height=params.height,
            width=params.width, num_frames=params.num_frames,
            num_inference_steps=params.num_inference_steps,
            guidance_scale=float(params.guidance_scale), seed=params.seed,
            max_sequence_length=params.max_sequence_length, image=params.image,
            embedded_guidance_scale=params.embedded_guidance_scale,
            guidance_end=float(params.guidance_end))
        if image is not None:
            # Read here, once: a bad image fails before any model runs, and worker
            # processes need no access to where it is stored.
            batch.image_pixels = image_to_pixels(load_image(image))
        batch = self._forward(batch)
        results = [
            GenerationResult(prompt=p, seed=params.seed, frames=batch.output[i],
                             latents=batch.latents[i].float().cpu(), timings=dict(batch.timings))
            for i, p in enumerate(batch.prompt)
        ]
        if output_path is not None:
            self._write_videos(results, Path(output_path), fps or self.pipeline_class.fps)
        logger.info("generated %d video(s): %s", len(results),
                    ", ".join(f"{k} {v:.2f}s" for k, v in batch.timings.items()))
        return results[0] if isinstance(prompt, str) else results

    @staticmethod
    def _write_videos(results: list[GenerationResult], output_path: Path, fps: int) -> None:
        if output_path.suffix == ".mp4":
            if len(results) != 1:
                raise ValueError(
                    f"output_path {output_path} names one file but {len(results)} prompts were given; "
                    f"pass a folder")
            paths = [output_path]
        else:
            paths = [output_path / video_file_name(r.prompt, r.seed) for r in results]
        for result, path in zip(results, paths):
            result.video_path = str(write_mp4(result.frames, path, fps=fps).resolve())
