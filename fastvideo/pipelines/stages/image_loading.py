"""ImageLoadingStage: the request's image (a path or store URI) -> RGB pixels."""

from __future__ import annotations

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.forward_batch import ForwardBatch
from fastvideo.pipelines.stages.base import PipelineStage
from fastvideo.utils.image_io import image_to_pixels, load_image


class ImageLoadingStage(PipelineStage):
    """Reads `batch.image` into `batch.image_pixels`; pixels already on the batch (a caller
    given a PIL image) are kept. Errors name the image (see `load_image`)."""

    reads = ()  # `image` or `image_pixels`, checked below
    writes = ("image_pixels",)

    def forward(self, batch: ForwardBatch, fastvideo_args: FastVideoArgs) -> ForwardBatch:
        if batch.image_pixels is not None:
            return batch
        if batch.image is None:
            raise ValueError(f"{self.name}: this image-to-video pipeline needs an image; set "
                             "ForwardBatch.image (a path or store URI) or image_pixels")
        batch.image_pixels = image_to_pixels(load_image(batch.image))
        return batch
