"""VideoGenerator with tp_size=2 (two CPU processes on gloo): the UMT5 text encoder is split
over the two workers by heads and feed-forward width, and the video equals one process's."""

from __future__ import annotations

from pathlib import Path

import torch

from fastvideo import VideoGenerator

# As small as the tiny checkpoint allows: the test is about the text encoder.
REQUEST = dict(prompt="a cat walks across a sunny garden", height=16, width=16, num_frames=1,
               num_inference_steps=1, seed=11)


def test_wan_at_tp2_equals_one_process(tiny_wan_path: Path) -> None:
    expected = VideoGenerator.from_pretrained(tiny_wan_path, device="cpu").generate_video(
        **REQUEST)
    with VideoGenerator.from_pretrained(tiny_wan_path, device="cpu", num_gpus=2, tp_size=2,
                                        sp_size=1) as generator:
        result = generator.generate_video(**REQUEST)
    # fp32; the text embeddings differ by a few ulp (the row-parallel all-reduce sums in
    # another order), as the sp=2 test of test_multiproc_executor.py allows: 1e-5 / 1e-4.
    torch.testing.assert_close(result.latents, expected.latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(result.frames, expected.frames, rtol=0, atol=1e-4)
