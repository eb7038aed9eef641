"""Wan DiT with sequence parallel size 2 (two gloo processes) against one process."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from rank_launcher import assert_max_abs_diff, run_on_ranks
from step_cache_check import step_cache_outputs

from fastvideo.attention import DistributedAttention
from fastvideo.attention.layer import HeadExchange, request_attention_backend
from fastvideo.attention.metadata import AttentionMetadata
from fastvideo.attention.sta_config import STAConfig
from fastvideo.models.compile import compile_repeated_blocks
from fastvideo.models.dits.wanvideo import WanTransformer3DModel
from tests.parity.test_wan_dit import TINY_CONFIG

# fp32; the same math per token and per head, only summation order inside kernels differs.
TOL = 1e-5


def _check_sp_equals_one_process(state: dict[str, torch.Tensor], inputs: dict[str, Any],
                                 expected: torch.Tensor, sta: bool) -> None:
    model = WanTransformer3DModel(**TINY_CONFIG).eval()
    model.load_state_dict(state)
    if sta:
        request_attention_backend(model, "SLIDING_TILE_ATTN")
    inputs_seen: list[type] = []
    for layer in model.modules():
        if isinstance(layer, DistributedAttention):
            layer.register_forward_pre_hook(
                lambda _, args: inputs_seen.extend(type(x) for x in args))
    with torch.no_grad():
        out = model(**inputs)
    assert_max_abs_diff(out, expected, TOL)  # every rank holds the gathered output
    # The self-attention started its all-to-alls itself, overlapping its projections.
    assert inputs_seen and set(inputs_seen) == {HeadExchange}


def _random_model() -> WanTransformer3DModel:
    torch.manual_seed(0)
    model = WanTransformer3DModel(**TINY_CONFIG).eval()
    with torch.no_grad():
        for param in model.parameters():  # no zero-initialised parameter hides a bug
            param.normal_(0, 0.2)
    return model


# Head 0 attends one tile, head 1 densely: rank 1 holds head 1 only, so it must read the
# window of global head 1 (the head offset `DistributedAttention` sets).
STA_CONFIG = STAConfig(tile_size=(1, 2, 2),
                       windows={0: [[(1, 1, 1), None]] * TINY_CONFIG["num_layers"]})


@pytest.mark.parametrize(("latent_shape", "sta"), [
    ((2, 4, 3, 4, 6), False),  # 3 x 2 x 3 = 18 tokens: 9 per rank
    ((1, 4, 3, 6, 2), False),  # 3 x 3 x 1 = 9 tokens: padded to 10
    ((1, 4, 3, 8, 8), True),  # sliding tile attention with a window per head
])
def test_sp2_equals_sp1(latent_shape: tuple[int, ...], sta: bool) -> None:
    model = _random_model()
    generator = torch.Generator().manual_seed(1)
    batch = latent_shape[0]
    inputs: dict[str, Any] = {
        "hidden_states": torch.randn(latent_shape, generator=generator),
        "encoder_hidden_states": torch.randn(batch, 7, TINY_CONFIG["text_dim"],
                                             generator=generator),
        "timestep": torch.tensor([999.0, 37.5][:batch]),
    }
    if sta:
        request_attention_backend(model, "SLIDING_TILE_ATTN")
        inputs["attn_metadata"] = AttentionMetadata(sta_config=STA_CONFIG)
    with torch.no_grad():
        expected = model(**inputs)
    if sta:  # the windows make a difference
        request_attention_backend(model, "TORCH_SDPA")
        with torch.no_grad():
            assert (model(**inputs) - expected).abs().max() > 1e-3
    run_on_ranks(_check_sp_equals_one_process, model.state_dict(), inputs, expected, sta,
                 sp_size=2)


def _check_compiled_sp(state: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor],
                       expected: torch.Tensor) -> None:
    model = WanTransformer3DModel(**TINY_CONFIG).eval()
    model.load_state_dict(state)
    # As the engine does: the attention layers choose their backends before the trace.
    assert compile_repeated_blocks(model, dtype=torch.float32) == TINY_CONFIG["num_layers"]
    torch._dynamo.config.error_on_recompile = True  # blocks share their graphs, calls too
    try:
        with torch.no_grad():
            for _ in range(2):
                assert_max_abs_diff(model(**inputs), expected, TOL)
    finally:
        torch._dynamo.config.error_on_recompile = False


def test_compiled_blocks_under_sp2_equal_sp1() -> None:
    """`enable_torch_compile` with `num_gpus=2`: the all-to-alls split the compiled graphs."""
    model = _random_model()
    generator = torch.Generator().manual_seed(1)
    inputs = {"hidden_states": torch.randn((1, 4, 3, 6, 2), generator=generator),  # padded
              "encoder_hidden_states": torch.randn(1, 7, TINY_CONFIG["text_dim"],
                                                   generator=generator),
              "timestep": torch.tensor([999.0])}
    with torch.no_grad():
        expected = model(**inputs)
    run_on_ranks(_check_compiled_sp, model.state_dict(), inputs, expected,
                 sp_size=2, timeout_s=240)


def _check_step_cache_sp(state: dict[str, torch.Tensor], inputs: dict[str, Any],
                         expected: tuple[torch.Tensor, torch.Tensor]) -> None:
    model = WanTransformer3DModel(**TINY_CONFIG).eval()
    model.load_state_dict(state)
    for out, ref in zip(step_cache_outputs(model, inputs), expected):
        assert_max_abs_diff(out, ref, TOL)


def test_step_cache_residual_under_sp2_equals_sp1() -> None:
    """Each rank keeps the residual of its own (padded) tokens; a reused step gives the
    one-process output."""
    model = _random_model()
    generator = torch.Generator().manual_seed(1)
    inputs: dict[str, Any] = {  # 3 x 3 x 1 = 9 tokens: padded to 10 at sp=2
        "hidden_states": torch.randn((1, 4, 3, 6, 2), generator=generator),
        "encoder_hidden_states": torch.randn(1, 7, TINY_CONFIG["text_dim"], generator=generator),
        "timestep": torch.tensor([999.0]),
    }
    expected = step_cache_outputs(model, inputs)
    with torch.no_grad():  # reusing is not running the blocks
        computed = model(**{**inputs, "timestep": inputs["timestep"] * 0.5})
    assert (computed - expected[1]).abs().max() > 1e-3
    run_on_ranks(_check_step_cache_sp, model.state_dict(), inputs, expected, sp_size=2)
