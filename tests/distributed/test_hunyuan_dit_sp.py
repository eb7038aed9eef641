"""HunyuanVideo DiT and the joint (video + replicated text) attention with sequence parallel
size 2 (two gloo processes) against one process."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from rank_launcher import assert_max_abs_diff, run_on_ranks
from step_cache_check import step_cache_outputs

from fastvideo.attention import DistributedAttention
from fastvideo.attention.layer import AppendedTokens
from fastvideo.distributed import get_sp_world_size, sequence_model_parallel_shard
from fastvideo.models.dits.hunyuanvideo import HunyuanVideoTransformer3DModel
from tests.models.test_hunyuan_dit import TINY_CONFIG, make_inputs

# fp32; the same math per token and per head, only summation order inside kernels differs.
TOL = 1e-5
NUM_HEADS, HEAD_SIZE = 4, 8


def _joint_reference(q, k, v, tq, tk, tv, lengths):
    """Per item: SDPA over the video tokens followed by its real text tokens."""
    video, text = [], []
    for i, n in enumerate(lengths):
        query, key, value = (torch.cat([x[i:i + 1], t[i:i + 1, :n]], dim=1).transpose(1, 2)
                             for x, t in ((q, tq), (k, tk), (v, tv)))
        out = F.scaled_dot_product_attention(query, key, value).transpose(1, 2)
        video.append(out[:, :q.shape[1]])
        text.append(F.pad(out[:, q.shape[1]:], (0, 0, 0, 0, 0, tq.shape[1] - n)))
    return torch.cat(video), torch.cat(text)


def _check_joint_attention(seq_len: int, lengths: list[int]) -> None:
    torch.manual_seed(0)  # every rank builds the same tensors
    batch = len(lengths)
    q, k, v = (torch.randn(batch, seq_len, NUM_HEADS, HEAD_SIZE) for _ in range(3))
    text = [torch.randn(batch, max(lengths) + 1, NUM_HEADS, HEAD_SIZE) for _ in range(3)]
    expected_video, expected_text = _joint_reference(q, k, v, *text, lengths)
    padding = -seq_len % get_sp_world_size()
    local = [sequence_model_parallel_shard(F.pad(x, (0, 0, 0, 0, 0, padding)), dim=1)
             for x in (q, k, v)]
    attention = DistributedAttention(NUM_HEADS, HEAD_SIZE)
    video, text_out = attention.forward_joint(
        *local, AppendedTokens(*text, lengths), valid_len=seq_len)
    expected_video = sequence_model_parallel_shard(
        F.pad(expected_video, (0, 0, 0, 0, 0, padding)), dim=1)
    assert_max_abs_diff(video, expected_video, TOL)
    assert_max_abs_diff(text_out, expected_text, TOL)  # all heads, padding rows zero


@pytest.mark.parametrize(("seq_len", "lengths"), [
    (7, [3, 5]),  # video padded to 8; prompts of different lengths
    (10, [4, 4, 2]),  # micro-batches of 1 and 2 items
])
def test_joint_attention_equals_single_process(seq_len: int, lengths: list[int]) -> None:
    run_on_ranks(_check_joint_attention, seq_len, lengths, sp_size=2)


def _check_dit(state: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor],
               expected: torch.Tensor) -> None:
    model = HunyuanVideoTransformer3DModel(**TINY_CONFIG).eval()
    model.load_state_dict(state)
    with torch.no_grad():
        assert_max_abs_diff(model(**inputs), expected, TOL)  # every rank holds the output


def _random_model() -> HunyuanVideoTransformer3DModel:
    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(**TINY_CONFIG).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("lengths", [[4, 6], [5]])
def test_dit_sp2_equals_sp1(lengths: list[int]) -> None:
    """45 video tokens (padded to 46 over two ranks); text of different lengths."""
    model = _random_model()
    inputs = make_inputs(lengths)
    with torch.no_grad():
        expected = model(**inputs)
    run_on_ranks(_check_dit, model.state_dict(), inputs, expected, sp_size=2)


def _check_step_cache(state, inputs, expected) -> None:
    model = HunyuanVideoTransformer3DModel(**TINY_CONFIG).eval()
    model.load_state_dict(state)
    for out, ref in zip(step_cache_outputs(model, inputs), expected):
        assert_max_abs_diff(out, ref, TOL)


def test_step_cache_residual_under_sp2_equals_sp1() -> None:
    model = _random_model()
    inputs = make_inputs([4, 6])  # 45 video tokens: padded to 46
    expected = step_cache_outputs(model, inputs)
    run_on_ranks(_check_step_cache, model.state_dict(), inputs, expected, sp_size=2)
