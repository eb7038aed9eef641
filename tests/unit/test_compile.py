"""`enable_torch_compile`: same video, one compile per shape, no recompiles across steps/items."""

from __future__ import annotations

from pathlib import Path

import torch
import torch._dynamo

from fastvideo import VideoGenerator

REQUEST = dict(height=32, width=32, num_frames=5, num_inference_steps=3)


def test_compiled_blocks_match_eager_without_recompiling(tiny_wan_path: Path) -> None:
    eager = VideoGenerator.from_pretrained(tiny_wan_path, device="cpu")
    compiled = VideoGenerator.from_pretrained(tiny_wan_path, device="cpu", enable_torch_compile=True)
    torch._dynamo.reset()
    first = compiled.generate_video("a cat", seed=1, **REQUEST)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    # Every later step, prompt and seed of the same shape must reuse the compiled graph.
    torch._dynamo.config.error_on_recompile = True
    try:
        second = compiled.generate_video("a red car drives along the coast", seed=2, **REQUEST)
    finally:
        torch._dynamo.config.error_on_recompile = False
    for result, prompt, seed in ((first, "a cat", 1), (second, "a red car drives along the coast", 2)):
        reference = eager.generate_video(prompt, seed=seed, **REQUEST)
        # Inductor fuses fp32 element-wise ops differently: allow 1e-4 on the latents.
        torch.testing.assert_close(result.latents, reference.latents, rtol=0, atol=1e-4)
