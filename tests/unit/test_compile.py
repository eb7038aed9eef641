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
    # Sliding tile attention is one custom op in the block (it looks its plan up when it
    # runs): one graph for every block, no graph break at the attention. (The eager
    # FlexAttention call on CPU inside the op traces one graph of its own.)
    torch._dynamo.utils.counters.clear()
    graphs = _unique_graphs_after_three_forwards(12, preselect=True, sta=True)
    assert not torch._dynamo.utils.counters["graph_break"], \
        dict(torch._dynamo.utils.counters["graph_break"])
    assert graphs == _unique_graphs_after_three_forwards(3, preselect=True, sta=True) == 2


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
    dense nor a sliding tile block may guard on it (STA's op reads it when it runs). Nor
    does STA's switch from dense steps to sparse ones recompile: the op decides inside."""
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
            model(x, text, torch.tensor([999.0]), attn_metadata=AttentionMetadata(
                sta_config=config if sta else None, step=0))  # dense under STA too
            torch._dynamo.config.error_on_recompile = True
            try:
                for step in (1, 2, 3):  # step 1: the first sparse one under STA
                    model(x, text, torch.tensor([999.0]), attn_metadata=AttentionMetadata(
                        sta_config=config if sta else None, step=step))
            finally:
                torch._dynamo.config.error_on_recompile = False


def test_compiled_sliding_tile_blocks_match_eager() -> None:
    """STA's custom op in compiled blocks gives eager STA's output at dense and sparse steps,
    with windows that differ per layer and per step (so each block must find its own
    layer's windows at run time), and without a recompile from block to block or step to
    step."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from bench_dit import CONFIGS

    from fastvideo.attention.backends.sliding_tile import sliding_tile_attention_op
    from fastvideo.attention.layer import request_attention_backend
    from fastvideo.attention.metadata import AttentionMetadata
    from fastvideo.attention.sta_config import STAConfig
    from fastvideo.models.compile import compile_repeated_blocks
    from fastvideo.models.dits.wanvideo import WanTransformer3DModel

    heads = CONFIGS["tiny"]["num_attention_heads"]
    layers = 3
    # Step 1: layer 0 dense, layer 1 narrow, layer 2 one head wide; step 2 the default.
    config = STAConfig(tile_size=(1, 2, 2), num_full_steps=1, default_window=(1, 1, 1),
                       windows={1: ((None,) * heads, ((1, 1, 1),) * heads,
                                    ((3, 4, 4),) + ((1, 1, 1),) * (heads - 1))})
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = WanTransformer3DModel.from_config({**CONFIGS["tiny"], "num_layers": layers}).eval()
    for param in eager.parameters():
        torch.nn.init.normal_(param, std=0.02)
    compiled = WanTransformer3DModel.from_config({**CONFIGS["tiny"],
                                                  "num_layers": layers}).eval()
    compiled.load_weights(eager.state_dict().items())
    for model in (eager, compiled):
        request_attention_backend(model, "SLIDING_TILE_ATTN")
    compile_repeated_blocks(compiled, dtype=torch.float32)
    x, text = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 16, 32)
    outputs = {}
    with torch.inference_mode():
        for step in (0, 1, 2):
            metadata = AttentionMetadata(sta_config=config, step=step)
            outputs[step] = eager(x, text, torch.tensor([999.0]), attn_metadata=metadata)
            torch.testing.assert_close(
                compiled(x, text, torch.tensor([999.0]), attn_metadata=metadata),
                outputs[step], rtol=0, atol=1e-5)
    # One compiled entry for the blocks' code: no recompile per block or per step (the eager
    # FlexAttention call inside the op compiles for itself; it is not counted here).
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    block_code = type(compiled.blocks[0]).forward.__code__
    assert len(_debug_get_cache_entry_list(block_code)) == 1
    assert not torch._dynamo.utils.counters["graph_break"]
    # The steps really differ (dense, per-layer windows, default windows).
    assert (outputs[0] - outputs[1]).abs().max() > 1e-4
    assert (outputs[1] - outputs[2]).abs().max() > 1e-4
    # The step and layer tensors stay on the CPU under any default device (the op reads
    # them without waiting for the GPU).
    with torch.device("meta"):
        assert AttentionMetadata(step=4).step_tensor.device.type == "cpu"
    assert {block.attn1.attn.impl_for(torch.float32, torch.device("cpu"))._layer_tensor.device.type
            for block in compiled.blocks} == {"cpu"}
    # The op returns a new tensor: the aliasing check PyTorch runs is off for it.
    q = torch.randn(1, 3 * 4 * 4, heads, 16)
    out = sliding_tile_attention_op(q, q, q, torch.tensor([0]), torch.tensor([1]),
                                    AttentionMetadata(sta_config=config).sta_key, [3, 4, 4],
                                    0, 0, heads, None)
    assert out.shape == q.shape and out.untyped_storage().data_ptr() != \
        q.untyped_storage().data_ptr()
