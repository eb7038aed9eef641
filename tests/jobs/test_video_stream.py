"""Encoding an item's mp4 while it decodes: the chunks are exactly the decode's output,
and the streamed video is the file encoded after, or not used at all."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastvideo.jobs.video_stream import StreamedVideo
from fastvideo.models.vae_chunks import decode_in_chunks
from fastvideo.pipelines.stages.decoding import frame_sink, frames_as_uint8
from fastvideo.utils.video_io import to_uint8, write_mp4


@pytest.fixture(scope="module")
def vae(tiny_wan_path: Path):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan.from_pretrained(tiny_wan_path / "vae").eval()


def _latents(frames: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 4, frames, 6, 8, generator=torch.Generator().manual_seed(seed))


def test_chunks_are_the_decode_exactly(vae) -> None:
    latents = _latents()
    with torch.no_grad():
        whole = vae.decode(latents, return_dict=False)[0]
        chunks = list(decode_in_chunks(vae, latents))
    # One chunk per latent frame: the first decodes to 1 frame, each other to 2 here.
    assert [c.shape[2] for c in chunks] == [1, 2, 2]
    assert torch.equal(torch.cat(chunks, dim=2), whole)
    assert whole.abs().max() > 0.01
    assert vae._feat_map is None or all(f is None for f in vae._feat_map)  # cache cleared


def test_decodes_whole_where_the_loop_differs(vae) -> None:
    assert decode_in_chunks(torch.nn.Linear(2, 2), _latents()) is None
    vae.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=16)
    try:
        assert decode_in_chunks(vae, _latents()) is None  # tiled at this size
    finally:
        vae.disable_tiling()
    assert decode_in_chunks(vae, _latents()) is not None


def test_decoding_stage_hands_over_chunks_without_changing_its_output(tiny_wan_path) -> None:
    from fastvideo import VideoGenerator
    from fastvideo.forward_batch import ForwardBatch

    generator = VideoGenerator.from_pretrained(tiny_wan_path, device="cpu")
    stage = generator.pipeline.get_stage("decoding_stage")
    args = generator.pipeline.fastvideo_args
    plain = stage(ForwardBatch(latents=_latents(seed=1)), args).output
    got: list[torch.Tensor] = []
    with frame_sink(got.append):
        streamed = stage(ForwardBatch(latents=_latents(seed=1)), args).output
    assert torch.equal(streamed, plain)
    assert len(got) == 3 and torch.equal(torch.cat(got, dim=1), plain)
    got.clear()
    stage(ForwardBatch(latents=_latents(seed=1)), args)  # outside the block: no sink
    assert got == []


def test_decoding_stage_rounds_to_uint8_on_request_as_the_host_would(tiny_wan_path) -> None:
    from fastvideo import VideoGenerator
    from fastvideo.forward_batch import ForwardBatch

    generator = VideoGenerator.from_pretrained(tiny_wan_path, device="cpu")
    stage = generator.pipeline.get_stage("decoding_stage")
    args = generator.pipeline.fastvideo_args
    plain = stage(ForwardBatch(latents=_latents(seed=2)), args).output
    with frames_as_uint8():
        rounded = stage(ForwardBatch(latents=_latents(seed=2)), args).output
    assert plain.dtype == torch.float32 and rounded.dtype == torch.uint8
    assert torch.equal(rounded, to_uint8(plain)) and rounded.float().std() > 1
    # Outside the block: float frames again.
    assert stage(ForwardBatch(latents=_latents(seed=2)), args).output.dtype == torch.float32


def test_streamed_video_is_the_encoded_file_or_nothing(tmp_path: Path) -> None:
    frames = torch.rand(1, 5, 32, 48, 3, generator=torch.Generator().manual_seed(0))
    expected = write_mp4(frames[0], tmp_path / "after.mp4", fps=8).read_bytes()
    final = to_uint8(frames)

    stream = StreamedVideo(fps=8)
    stream(frames[:, :1])
    stream(frames[:, 1:])
    path = stream.finish(final)
    assert path is not None and path.read_bytes() == expected
    stream.cleanup()
    assert not path.exists()

    # Frames other than the item's final ones: not used, nothing left behind.
    other = StreamedVideo(fps=8)
    other(frames[:, :4])
    assert other.finish(final) is None
    assert other.finish(None) is None
    other.cleanup()
    nothing = StreamedVideo(fps=8)
    assert nothing.finish(final) is None  # nothing streamed
    nothing.cleanup()

    # A batch of two videos is not one video: the stream gives up, the caller encodes.
    pair = StreamedVideo(fps=8)
    pair(torch.cat([frames, frames]))
    assert pair.finish(final) is None
    pair.cleanup()
