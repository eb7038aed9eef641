"""The stages pipelines are built from, one file per kind."""

from fastvideo.pipelines.stages.base import PipelineStage, StageContractError
from fastvideo.pipelines.stages.clip_text_encoding import CLIPTextEncodingStage
from fastvideo.pipelines.stages.decoding import DecodingStage
from fastvideo.pipelines.stages.denoising import DenoisingStage
from fastvideo.pipelines.stages.geometry import LatentGeometry
from fastvideo.pipelines.stages.image_conditioning import ImageConditioningStage
from fastvideo.pipelines.stages.image_encoding import CLIPImageEncodingStage
from fastvideo.pipelines.stages.image_loading import ImageLoadingStage
from fastvideo.pipelines.stages.input_validation import InputValidationStage
from fastvideo.pipelines.stages.latent_preparation import LatentPreparationStage
from fastvideo.pipelines.stages.llama_encoding import LlamaEncodingStage, PromptTemplate
from fastvideo.pipelines.stages.text_encoding import T5EncodingStage
from fastvideo.pipelines.stages.timestep_preparation import TimestepPreparationStage

__all__ = [
    "CLIPImageEncodingStage", "CLIPTextEncodingStage", "DecodingStage", "DenoisingStage",
    "ImageConditioningStage", "ImageLoadingStage", "InputValidationStage", "LatentGeometry",
    "LatentPreparationStage", "LlamaEncodingStage", "PipelineStage", "PromptTemplate",
    "StageContractError", "T5EncodingStage", "TimestepPreparationStage",
]
