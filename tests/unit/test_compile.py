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


def _unique_graphs_after_three_forwards(num_layers: int, *, preselect: bool,
                                        sta: bool = False) -> int:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from bench_dit import CONFIGS

    from fastvideo.attention.layer import request_attention_backend
    from fastvideo.attention.metadata import AttentionMetadata
    from fastvideo.attention.sta_config import STAConfig
    from fastvideo.models.compile import compile_repeated_blocks
    from fastvideo.models.dits.wanvideo import WanTransformer3DModel

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = WanTransformer3DModel.from_config({**CONFIGS["tiny"], "num_layers": num_layers})
    for param in model.eval().parameters():
        torch.nn.init.normal_(param, std=0.02)
    compile_repeated_blocks(model, dtype=torch.float32 if preselect else None)
    config = None
    if sta:  # requested after compiling, as bench_dit does: layers choose again at once
        request_attention_backend(model, "SLIDING_TILE_ATTN")
        config = STAConfig(tile_size=(1, 2, 2), default_window=(1, 1, 1))
    with torch.inference_mode():
        # A new step each forward, as in the denoising loop: no recompile for it.
        for step in range(3):
            model(torch.randn(1, 4, 3, 8, 8), torch.randn(1, 16, 32), torch.tensor([999.0]),
                  attn_metadata=AttentionMetadata(sta_config=config, step=step))
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_compiled_blocks_share_their_graphs_at_any_depth() -> None:
    """Blocks share one compiled code: a guard that tells block instances apart (state a
    block's first trace creates, say) recompiles per block, and past Dynamo's recompile
    limit (8) the remaining blocks silently run eagerly. A 30-block Wan DiT on an H100 lost
    its whole compile gain that way (553 against 454 ms per forward)."""
    # Backends chosen before compiling (the engine's path): one graph for every block.
    assert _unique_graphs_after_three_forwards(12, preselect=True) == 1
    assert _unique_graphs_after_three_forwards(3, preselect=True) == 1
    # Chosen inside the first trace: the blocks split, but still share their graphs.
    assert (_unique_graphs_after_three_forwards(12, preselect=False)
            == _unique_graphs_after_three_forwards(3, preselect=False))
    # Sliding tile attention breaks the graph on purpose (its plan is Python-side lookups).
    assert (_unique_graphs_after_three_forwards(12, preselect=True, sta=True)
            == _unique_graphs_after_three_forwards(3, preselect=True, sta=True))


def test_blocks_compile_as_one_graph_once_backends_are_chosen() -> None:
    """`compile_repeated_blocks(..., dtype=...)` (the engine's path) lets each attention
    layer choose its backend first; the block then traces without a graph break."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from bench_dit import CONFIGS

    from fastvideo.attention.layer import select_attention_backends
    from fastvideo.models.dits.wanvideo import WanTransformer3DModel

    torch._dynamo.reset()
    reference = WanTransformer3DModel.from_config(CONFIGS["tiny"]).eval()
    for param in reference.parameters():
        torch.nn.init.normal_(param, std=0.02)
    model = WanTransformer3DModel.from_config(CONFIGS["tiny"]).eval()  # cold: nothing chosen
    model.load_weights(reference.state_dict().items())
    x, text = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 16, 32)
    assert select_attention_backends(model, torch.float32) == 2 * CONFIGS["tiny"]["num_layers"]
    for block in model.blocks:
        block.compile(fullgraph=True, dynamic=False)  # a graph break raises
    with torch.inference_mode():
        torch.testing.assert_close(model(x, text, torch.tensor([999.0])),
                                   reference(x, text, torch.tensor([999.0])), rtol=0, atol=1e-5)


def test_a_new_step_recompiles_no_block() -> None:
    """The denoising step changes every forward and rides in `attn_metadata`: neither a
    dense nor a sliding tile block may guard on it (STA reads it outside the graph). STA's
    switch from dense steps to sparse ones recompiles the code after its plan once (the
    plan turns from None to a mask); later steps reuse it."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from bench_dit import CONFIGS

    from fastvideo.attention.layer import request_attention_backend
    from fastvideo.attention.metadata import AttentionMetadata
    from fastvideo.attention.sta_config import STAConfig
    from fastvideo.models.compile import compile_repeated_blocks
    from fastvideo.models.dits.wanvideo import WanTransformer3DModel

    config = STAConfig(tile_size=(1, 2, 2), num_full_steps=1, default_window=(1, 1, 1))
    for sta in (False, True):
        torch._dynamo.reset()
        model = WanTransformer3DModel.from_config({**CONFIGS["tiny"], "num_layers": 2}).eval()
        compile_repeated_blocks(model, dtype=torch.float32)
        if sta:
            request_attention_backend(model, "SLIDING_TILE_ATTN")
        x, text = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 16, 32)
        with torch.inference_mode():
            for step in (0, 1):  # step 0 dense, step 1 the first sparse one under STA
                model(x, text, torch.tensor([999.0]), attn_metadata=AttentionMetadata(
                    sta_config=config if sta else None, step=step))
            torch._dynamo.config.error_on_recompile = True
            try:
                for step in (2, 3):
                    model(x, text, torch.tensor([999.0]), attn_metadata=AttentionMetadata(
                        sta_config=config if sta else None, step=step))
            finally:
                torch._dynamo.config.error_on_recompile = False
