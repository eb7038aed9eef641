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


def test_a_block_compiles_as_one_graph_from_cold() -> None:
    """The attention layers pick their backend inside the first trace: nothing on that
    path (imports, probes of optional kernels) may break the block's graph, or the break
    stays in the compiled block for good and splits its fusions."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from bench_dit import CONFIGS

    from fastvideo.attention.layer import _AttentionLayer
    from fastvideo.models.dits.wanvideo import WanTransformer3DModel

    torch._dynamo.reset()
    model = WanTransformer3DModel.from_config(CONFIGS["tiny"]).eval()
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.02)
    x = torch.randn(1, 4, 3, 8, 8)
    text = torch.randn(1, 16, 32)
    with torch.inference_mode():
        expected = model(x, text, torch.tensor([999.0]))
        for layer in model.modules():
            if isinstance(layer, _AttentionLayer):
                layer._impls.clear()  # cold: no backend selected yet
        for block in model.blocks:
            block.compile(fullgraph=True, dynamic=False)  # a graph break raises
        torch.testing.assert_close(model(x, text, torch.tensor([999.0])), expected,
                                   rtol=0, atol=1e-5)
