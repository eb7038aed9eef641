"""`load_image`: PIL images, paths and store URIs in; every bad image is refused by name."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.forward_batch import ForwardBatch
from fastvideo.pipelines.stages import ImageLoadingStage
from fastvideo.utils.image_io import (
    MAX_IMAGE_PIXELS,
    ImageLoadError,
    image_to_pixels,
    load_image,
    pixels_to_image,
)

ARGS = FastVideoArgs(model_path="unused", device="cpu")


def _png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header for a `width x height` RGB image, followed by almost no data:
    what a decompression bomb looks like before decoding."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)))


@pytest.fixture
def png(tmp_path: Path) -> Path:
    """A 5x3 RGBA PNG (converted to RGB on load)."""
    pixels = np.arange(5 * 3 * 4, dtype=np.uint8).reshape(3, 5, 4)
    path = tmp_path / "small.png"
    Image.fromarray(pixels, mode="RGBA").save(path)
    return path


def test_path_uri_and_pil_load_the_same_rgb_pixels(png: Path) -> None:
    expected = np.array(Image.open(png).convert("RGB"))
    for source in (png, str(png), png.as_uri(), Image.open(png)):
        image = load_image(source)
        assert image.mode == "RGB" and image.size == (5, 3), source
        assert np.array_equal(np.array(image), expected), source
    pixels = image_to_pixels(load_image(png))
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 5, 3)
    assert np.array_equal(np.array(pixels_to_image(pixels)), expected)  # lossless both ways


def test_s3_uri(s3_env, png: Path) -> None:
    bucket = s3_env.create_bucket()
    s3_env.client().put_object(Bucket=bucket, Key="inputs/first.png", Body=png.read_bytes())
    assert np.array_equal(np.array(load_image(f"s3://{bucket}/inputs/first.png")),
                          np.array(load_image(png)))
    with pytest.raises(FileNotFoundError, match=f"image s3://{bucket}/inputs/none.png does "
                                                "not exist"):
        load_image(f"s3://{bucket}/inputs/none.png")


def test_missing_image_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"image file .*nope\.png does not exist"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(FileNotFoundError, match=r"image file:///.*nope\.png does not exist"):
        load_image((tmp_path / "nope.png").as_uri())
    with pytest.raises(ImageLoadError, match=r"is not a file"):
        load_image(tmp_path)


def test_non_image_and_truncated_files_are_named(tmp_path: Path, png: Path) -> None:
    text = tmp_path / "notes.png"
    text.write_bytes(b"these bytes are not an image")
    with pytest.raises(ImageLoadError, match=r"notes\.png is not an image file"):
        load_image(text)
    for suffix, image_format in ((".png", "PNG"), (".jpg", "JPEG")):
        whole = tmp_path / f"whole{suffix}"
        Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(whole, format=image_format)
        cut = tmp_path / f"cut{suffix}"
        cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
        with pytest.raises(ImageLoadError, match=rf"cut\{suffix} is truncated or corrupt"):
            load_image(cut)


def test_enormous_images_are_refused_from_the_header(tmp_path: Path) -> None:
    # 9000 x 9000 (81 Mpx) is over our limit but under PIL's bomb check: our check, which
    # reads only the header (the file has no pixel data to decode).
    big = tmp_path / "big.png"
    big.write_bytes(_png_claiming(9000, 9000))
    with pytest.raises(ImageLoadError, match=rf"big\.png is 9000x9000 = 81000000 pixels, more "
                                             rf"than the {MAX_IMAGE_PIXELS} allowed"):
        load_image(big)
    # Past PIL's own limits its DecompressionBombWarning / Error become our error too.
    for side in (10_000, 100_000):
        bomb = tmp_path / f"bomb{side}.png"
        bomb.write_bytes(_png_claiming(side, side))
        with pytest.raises(ImageLoadError, match=rf"bomb{side}\.png is too large"):
            load_image(bomb)
    with pytest.raises(ImageLoadError, match=r"the given PIL image is 40x30 = 1200 pixels"):
        load_image(Image.new("RGB", (40, 30)), max_pixels=1000)


def test_wrong_source_type() -> None:
    with pytest.raises(ValueError, match=r"image must be a PIL image, a local path or a store "
                                         r"URI .* got 42"):
        load_image(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"names no file"):
        load_image("s3://bucket/")


def test_loading_stage_reads_the_request_image_or_keeps_given_pixels(png: Path) -> None:
    stage = ImageLoadingStage()
    batch = stage(ForwardBatch(prompt=["x"], image=str(png)), ARGS)
    assert torch.equal(batch.image_pixels, image_to_pixels(load_image(png)))
    given = torch.zeros(2, 2, 3, dtype=torch.uint8)
    assert stage(ForwardBatch(prompt=["x"], image=str(png), image_pixels=given),
                 ARGS).image_pixels is given
    with pytest.raises(ValueError, match="needs an image"):
        stage(ForwardBatch(prompt=["x"]), ARGS)


def test_image_fields_checkpoint_and_split_by_item() -> None:
    from fastvideo.storage.batch_codec import decode_batch, encode_batch
    from fastvideo.worker.data_parallel import merge_batches, split_batch

    batch = ForwardBatch(prompt=["a", "b", "c"], image="s3://bucket/first.png",
                         image_pixels=torch.randint(0, 256, (4, 6, 3), dtype=torch.uint8),
                         image_embeds=torch.randn(3, 17, 24).bfloat16(),
                         condition_latents=torch.randn(3, 6, 2, 4, 4))
    back = decode_batch(encode_batch(batch))
    assert back.image == batch.image
    for name in ("image_pixels", "image_embeds", "condition_latents"):
        assert torch.equal(getattr(back, name), getattr(batch, name)), name
        assert getattr(back, name).dtype == getattr(batch, name).dtype, name

    part = split_batch(batch, 1, 3)
    assert part.image_pixels is batch.image_pixels  # one image for every item
    assert torch.equal(part.image_embeds, batch.image_embeds[1:3])
    assert torch.equal(part.condition_latents, batch.condition_latents[1:3])
    merged = merge_batches([split_batch(batch, 0, 1), part], batch)
    assert torch.equal(merged.condition_latents, batch.condition_latents)
    assert torch.equal(merged.image_embeds, batch.image_embeds)
