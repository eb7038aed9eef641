"""Wan2.1 image-to-video: the text-to-video pipeline plus a first frame.

The image conditions the DiT twice: its CLIP tokens are a second cross-attention context,
and its VAE latents (with a mask saying which latent frame they fill) are extra input
channels. Same math as diffusers' `WanImageToVideoPipeline` for Wan2.1 (not Wan2.2's
two-expert or expanded-timestep variants, nor a last frame).
"""

from __future__ import annotations

from fastvideo.attention.sta_config import STAConfig
from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.pipelines.composed_pipeline_base import ComposedPipelineBase
from fastvideo.pipelines.phases import Phase
from fastvideo.pipelines.stages import (
    CLIPImageEncodingStage,
    DecodingStage,
    DenoisingStage,
    ImageConditioningStage,
    ImageLoadingStage,
    InputValidationStage,
    LatentGeometry,
    LatentPreparationStage,
    T5EncodingStage,
    TimestepPreparationStage,
)
from fastvideo.pipelines.wan import family
from fastvideo.pipelines.wan.wan_pipeline import DECODE, ENCODE_TEXT, PREPARE_LATENTS

ENCODE_IMAGE = Phase(
    name="encode-image",
    stages=("image_loading_stage", "image_encoding_stage", "image_conditioning_stage"),
    writes=("image_embeds", "condition_latents"),
    modules=("image_encoder", "image_processor", "vae"),
    request=("image", "height", "width", "num_frames"), file_fields=("image",),
    training=("image_embeds", "condition_latents"))
DENOISE = Phase(
    name="denoise", stages=("denoising_stage",),
    reads=("prompt_embeds", "negative_prompt_embeds", "image_embeds", "condition_latents",
           "timesteps", "latents"),
    writes=("latents",), modules=("transformer", "scheduler"), request=(),
    training=("latents",), denoise=True)


class WanImageToVideoPipeline(ComposedPipelineBase):
    _required_config_modules = ["text_encoder", "tokenizer", "image_encoder", "image_processor",
                                "vae", "transformer", "scheduler"]
    phases = (ENCODE_TEXT, ENCODE_IMAGE, PREPARE_LATENTS, DENOISE, DECODE)
    requires_image = True
    default_sampling = family.SAMPLING
    fps = family.FPS

    def initialize_pipeline(self, fastvideo_args: FastVideoArgs) -> None:
        transformer_config = self.get_module("transformer").config
        self.normalization = family.latent_normalization(self.get_module("vae").config)
        self.geometry = LatentGeometry.from_configs(self.get_module("vae").config,
                                                    transformer_config)
        if getattr(transformer_config, "image_dim", None) is None:
            raise ValueError(f"{self.model_path}: the transformer has no image_dim, so it is not "
                             "a Wan2.1 image-to-video DiT (Wan2.2 I2V is not supported)")

    def create_pipeline_stages(self, fastvideo_args: FastVideoArgs) -> None:
        self.add_stage("input_validation_stage", InputValidationStage(self.geometry))
        self.add_stage("text_encoding_stage", T5EncodingStage(
            text_encoder=self.get_module("text_encoder"), tokenizer=self.get_module("tokenizer"),
            clean=family.clean_prompt))
        # The image's stages run together (one phase), after the text's and before the
        # noise: none draws random numbers, so the order does not change the video.
        self.add_stage("image_loading_stage", ImageLoadingStage())
        self.add_stage("image_encoding_stage", CLIPImageEncodingStage(
            image_encoder=self.get_module("image_encoder"),
            image_processor=self.get_module("image_processor")))
        self.add_stage("image_conditioning_stage",
                       ImageConditioningStage(vae=self.get_module("vae"), geometry=self.geometry,
                                              normalization=self.normalization))
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


EntryClass = WanImageToVideoPipeline
