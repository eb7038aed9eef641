"""Wan2.1 text-to-video."""

from __future__ import annotations

from fastvideo.attention.sta_config import STAConfig
from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.pipelines.composed_pipeline_base import ComposedPipelineBase
from fastvideo.pipelines.phases import Phase, SharedNegative
from fastvideo.pipelines.stages import (
    DecodingStage,
    DenoisingStage,
    InputValidationStage,
    LatentGeometry,
    LatentPreparationStage,
    T5EncodingStage,
    TimestepPreparationStage,
)
from fastvideo.pipelines.wan import family

ENCODE_TEXT = Phase(
    name="encode-text", stages=("input_validation_stage", "text_encoding_stage"),
    writes=("prompt_embeds",), modules=("text_encoder", "tokenizer"),
    optional_writes=("negative_prompt_embeds",),
    request=("prompt", "negative_prompt", "max_sequence_length"),
    training=("prompt_embeds",), shared_negative=SharedNegative())
PREPARE_LATENTS = Phase(
    name="prepare-latents", stages=("timestep_preparation_stage", "latent_preparation_stage"),
    writes=("timesteps", "latents", "step_index"), modules=("scheduler",),
    request=("seed", "height", "width", "num_frames", "num_inference_steps", "guidance_scale",
             "guidance_end",
             "max_sequence_length"))
DENOISE = Phase(
    name="denoise", stages=("denoising_stage",),
    reads=("prompt_embeds", "negative_prompt_embeds", "timesteps", "latents"),
    writes=("latents",), modules=("transformer", "scheduler"), request=(),
    training=("latents",), denoise=True)
DECODE = Phase(name="decode", stages=("decoding_stage",), reads=("latents",),
               writes=("output",), modules=("vae",), request=(), frames="output")


class WanPipeline(ComposedPipelineBase):
    _required_config_modules = ["text_encoder", "tokenizer", "vae", "transformer", "scheduler"]
    phases = (ENCODE_TEXT, PREPARE_LATENTS, DENOISE, DECODE)
    default_sampling = family.SAMPLING
    fps = family.FPS

    def initialize_pipeline(self, fastvideo_args: FastVideoArgs) -> None:
        self.geometry = LatentGeometry.from_configs(
            self.get_module("vae").config, self.get_module("transformer").config)
        self.normalization = family.latent_normalization(self.get_module("vae").config)

    def create_pipeline_stages(self, fastvideo_args: FastVideoArgs) -> None:
        self.add_stage("input_validation_stage", InputValidationStage(self.geometry))
        self.add_stage("text_encoding_stage", T5EncodingStage(
            text_encoder=self.get_module("text_encoder"), tokenizer=self.get_module("tokenizer"),
            clean=family.clean_prompt))
        self.add_stage("timestep_preparation_stage",
                       TimestepPreparationStage(scheduler=self.get_module("scheduler")))
        self.add_stage("latent_preparation_stage", LatentPreparationStage(self.geometry))
        sta_config = (STAConfig.load(fastvideo_args.sta_config)
                      if fastvideo_args.sta_config is not None else None)
        self.add_stage("denoising_stage", DenoisingStage(
            transformer=self.get_module("transformer"), scheduler=self.get_module("scheduler"),
            sta_config=sta_config, batch_cfg=fastvideo_args.batch_cfg))
        self.add_stage("decoding_stage", DecodingStage(
            vae=self.get_module("vae"), normalization=self.normalization))


EntryClass = WanPipeline
