"""CLIPImageEncodingStage: the image -> CLIP vision tokens, the DiT's image context."""

from __future__ import annotations

from typing import Any

import torch

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.forward_batch import ForwardBatch
from fastvideo.pipelines.stages.base import PipelineStage
from fastvideo.utils.image_io import pixels_to_image


class CLIPImageEncodingStage(PipelineStage):
    """Runs the CLIP image processor (resize, center crop, normalise) and vision tower on
    the original image, keeping the hidden states of the penultimate layer, as Wan2.1 I2V
    (and diffusers' pipeline) does. One image serves every item; embeddings already on the
    batch are kept."""

    reads = ("prompt", "image_pixels")
    writes = ("image_embeds",)

    def __init__(self, image_encoder: Any, image_processor: Any) -> None:
        self.image_encoder = image_encoder
        self.image_processor = image_processor

    @torch.no_grad()
    def forward(self, batch: ForwardBatch, fastvideo_args: FastVideoArgs) -> ForwardBatch:
        if batch.image_embeds is not None:
            return batch
        # The processor resizes with PIL, so it gets the PIL image the user gave.
        inputs = self.image_processor(images=pixels_to_image(batch.image_pixels),
                                      return_tensors="pt")
        device = next(self.image_encoder.parameters()).device
        outputs = self.image_encoder(pixel_values=inputs["pixel_values"].to(device),
                                     output_hidden_states=True)
        embeds = outputs.hidden_states[-2]
        batch.image_embeds = embeds.repeat(batch.batch_size, 1, 1).to(fastvideo_args.torch_dtype)
        return batch
