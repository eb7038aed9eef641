"""Reading the conditioning image of image-to-video: a PIL image, a local path or a store URI.

Every failure names the image: a missing file, bytes that are no image, a truncated or
corrupt file, or an image so large that decoding it could exhaust memory (its size is
read from the header, before any pixel is decoded).
"""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

MAX_IMAGE_PIXELS = 8192 * 8192
"""Largest image accepted (64 megapixels, 192 MiB as RGB): far beyond any video frame, and
small enough that a hostile header cannot make decoding allocate gigabytes."""

ImageSource = str | Path | Image.Image
# What PIL's decoders raise on a truncated or corrupt stream.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)


class ImageLoadError(ValueError):
    """The image exists but cannot be used: not an image, corrupt, or too large."""


def load_image(source: ImageSource, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """The image as RGB, from a PIL image, a local path, or a store URI (`s3://bucket/a.png`,
    `file:///data/a.png`).

    Raises `FileNotFoundError` for a missing file or object and `ImageLoadError` (a
    `ValueError`) for anything else wrong with it; both name the image.
    """
    if isinstance(source, Image.Image):
        _check_size(source.size, "the given PIL image", max_pixels)
        return source.convert("RGB")
    if not isinstance(source, (str, Path)) or not str(source):
        raise ValueError(f"image must be a PIL image, a local path or a store URI "
                         f"(s3://..., file://...), got {source!r}")
    name = str(source)
    if "://" in name:
        return _decode(io.BytesIO(_read_uri(name)), name, max_pixels)
    path = Path(name)
    if not path.exists():
        raise FileNotFoundError(f"image file {name} does not exist")
    if not path.is_file():
        raise ImageLoadError(f"image {name} is not a file")
    try:
        with path.open("rb") as f:
            return _decode(f, name, max_pixels)
    except PermissionError as e:
        raise ImageLoadError(f"image file {name} cannot be read: {e}") from None


def image_to_pixels(image: Image.Image) -> torch.Tensor:
    """An RGB image as a `[H, W, 3]` uint8 tensor: lossless, and storable in a checkpoint."""
    return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8))


def pixels_to_image(pixels: torch.Tensor) -> Image.Image:
    """The inverse of `image_to_pixels`."""
    if pixels.dtype != torch.uint8 or pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ValueError(f"image pixels must be a [H, W, 3] uint8 tensor, got "
                         f"{pixels.dtype} {tuple(pixels.shape)}")
    return Image.fromarray(pixels.cpu().numpy(), mode="RGB")


def _read_uri(uri: str) -> bytes:
    from fastvideo.storage.uri import read_uri  # the engine's image loader needs no store

    return read_uri(uri, "image")


def _check_size(size: tuple[int, int], name: str, max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageLoadError(
            f"image {name} is {width}x{height} = {width * height} pixels, more than the "
            f"{max_pixels} allowed (fastvideo.utils.image_io.MAX_IMAGE_PIXELS); resize it first")


def _decode(f: BinaryIO, name: str, max_pixels: int) -> Image.Image:
    try:
        # PIL warns above Image.MAX_IMAGE_PIXELS and raises above twice that, both while
        # reading the header; as errors here, they become ours like any oversized image.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(f)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(f"image {name} is too large to decode safely: {e}") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{name} is not an image file in a format PIL reads "
                             "(PNG, JPEG, WebP, ...)") from None
    except _DECODE_ERRORS as e:  # a header cut short
        raise ImageLoadError(f"image {name} is truncated or corrupt: {e}") from None
    with image:
        _check_size(image.size, name, max_pixels)  # from the header: nothing decoded yet
        try:
            image.load()
        except _DECODE_ERRORS as e:
            raise ImageLoadError(f"image {name} is truncated or corrupt: {e}") from None
        return image.convert("RGB")
