"""HunyuanVideo text-to-video: diffusers' `HunyuanVideoPipeline` as stages.

Two text encoders (Llama hidden states in a prompt template, CLIP's pooled vector), a
guidance-distilled DiT that takes the guidance strength as an input (true classifier-free
guidance is an option: `guidance_scale` > 1 runs a negative branch too), flow-match Euler
with the reference's noise levels, and a tiled VAE decode.
"""

from __future__ import annotations

from fastvideo.attention.sta_config import STAConfig
from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.pipelines.composed_pipeline_base import ComposedPipelineBase, UnloadedModule
from fastvideo.pipelines.hunyuan import family
from fastvideo.pipelines.phases import Phase
from fastvideo.pipelines.stages import (
    CLIPTextEncodingStage,
    DecodingStage,
    DenoisingStage,
    InputValidationStage,
    LatentPreparationStage,
    LlamaEncodingStage,
    TimestepPreparationStage,
)
from fastvideo.pipelines.wan.wan_pipeline import DECODE

_TEXT = ("prompt_embeds", "prompt_attention_mask", "pooled_prompt_embeds")
_NEGATIVE_TEXT = tuple(f"negative_{name}" for name in _TEXT)

# Each item encodes its own negative prompt (three fields, under true CFG only), so the
# phase's output depends on guidance_scale.
ENCODE_TEXT = Phase(
    name="encode-text",
    stages=("input_validation_stage", "llama_encoding_stage", "clip_encoding_stage"),
    writes=_TEXT, optional_writes=_NEGATIVE_TEXT,
    modules=("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
    request=("prompt", "negative_prompt", "max_sequence_length", "guidance_scale"),
    training=_TEXT)
PREPARE_LATENTS = Phase(
    name="prepare-latents", stages=("timestep_preparation_stage", "latent_preparation_stage"),
    writes=("timesteps", "latents", "step_index"), modules=("scheduler",),
    request=("seed", "height", "width", "num_frames", "num_inference_steps", "guidance_scale",
             "guidance_end",
             "embedded_guidance_scale", "max_sequence_length"))
DENOISE = Phase(
    name="denoise", stages=("denoising_stage",),
    reads=(*_TEXT, *_NEGATIVE_TEXT, "timesteps", "latents"),
    writes=("latents",), modules=("transformer", "scheduler"), request=(),
    training=("latents",), denoise=True)


class HunyuanVideoPipeline(ComposedPipelineBase):
    _required_config_modules = ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                                "vae", "transformer", "scheduler"]
    phases = (ENCODE_TEXT, PREPARE_LATENTS, DENOISE, DECODE)
    default_sampling = family.SAMPLING
    fps = family.FPS

    def initialize_pipeline(self, fastvideo_args: FastVideoArgs) -> None:
        vae = self.get_module("vae")
        self.geometry = family.geometry(vae.config, self.get_module("transformer").config)
        self.normalization = family.latent_normalization(vae.config)
        if not isinstance(vae, UnloadedModule):
            # 720p x 129 frames decoded whole needs tens of GB; tiles bound it, as the
            # reference's example does (a no-op below the 256-pixel tile size).
            vae.enable_tiling()

    def create_pipeline_stages(self, fastvideo_args: FastVideoArgs) -> None:
        self.add_stage("input_validation_stage", InputValidationStage(self.geometry,
                                                                   embedded_guidance=True))
        self.add_stage("llama_encoding_stage", LlamaEncodingStage(
            text_encoder=self.get_module("text_encoder"), tokenizer=self.get_module("tokenizer"),
            template=family.PROMPT_TEMPLATE,
            hidden_layers_to_skip=family.LLAMA_HIDDEN_LAYERS_TO_SKIP))
        self.add_stage("clip_encoding_stage", CLIPTextEncodingStage(
            text_encoder=self.get_module("text_encoder_2"),
            tokenizer=self.get_module("tokenizer_2"), max_length=family.CLIP_MAX_LENGTH))
        self.add_stage("timestep_preparation_stage", TimestepPreparationStage(
            scheduler=self.get_module("scheduler"), sigmas=family.sigmas))
        self.add_stage("latent_preparation_stage", LatentPreparationStage(self.geometry))
        sta_config = (STAConfig.load(fastvideo_args.sta_config)
                      if fastvideo_args.sta_config is not None else None)
        self.add_stage("denoising_stage", DenoisingStage(
            transformer=self.get_module("transformer"), scheduler=self.get_module("scheduler"),
            sta_config=sta_config, batch_cfg=fastvideo_args.batch_cfg,
            dit_inputs=family.dit_inputs, sigmas=family.sigmas))
        self.add_stage("decoding_stage", DecodingStage(
            vae=self.get_module("vae"), normalization=self.normalization))


EntryClass = HunyuanVideoPipeline
