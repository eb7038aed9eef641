"""DistributedAttention (Ulysses) on two gloo processes against single-process SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from rank_launcher import assert_max_abs_diff, run_on_ranks

from fastvideo.attention import DistributedAttention
from fastvideo.distributed import get_sp_world_size, sequence_model_parallel_shard

# Each rank attends the same fp32 numbers per head as one process does; only the
# summation order inside the kernels may differ.
TOL = 1e-6
NUM_HEADS, HEAD_SIZE = 4, 8


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _check_matches_sdpa(seq_len: int, num_chunks: int) -> None:
    num_ranks = get_sp_world_size()
    torch.manual_seed(0)  # every rank builds the same full sequence
    q, k, v = (torch.randn(2, seq_len, NUM_HEADS, HEAD_SIZE) for _ in range(3))
    expected = _sdpa(q, k, v)
    # What the model does: zero-pad to a multiple of the sp size, keep this rank's block.
    padding = -seq_len % num_ranks
    q_pad, k_pad, v_pad = (F.pad(x, (0, 0, 0, 0, 0, padding)) for x in (q, k, v))
    local = [sequence_model_parallel_shard(x, dim=1) for x in (q_pad, k_pad, v_pad)]

    attention = DistributedAttention(NUM_HEADS, HEAD_SIZE, num_chunks=num_chunks)
    out = attention(*local, valid_len=seq_len)
    expected_local = sequence_model_parallel_shard(F.pad(expected, (0, 0, 0, 0, 0, padding)), 1)
    assert_max_abs_diff(out, expected_local, TOL)  # padding rows must come back zero


@pytest.mark.parametrize(("seq_len", "num_chunks"), [
    (10, 1),  # divides: 5 tokens per rank; one chunk, i.e. plain Ulysses
    (10, 2),  # 2 chunks of 1 head per rank, pipelined
    (7, 2),  # padded to 8
])
def test_equals_single_process_sdpa(seq_len: int, num_chunks: int) -> None:
    run_on_ranks(_check_matches_sdpa, seq_len, num_chunks, sp_size=2)


def _check_bad_head_counts() -> None:
    with pytest.raises(ValueError, match=r"3 attention heads .* sequence parallel size of 2; sp sizes that "
                                         r"work: \[1, 3\]"):
        DistributedAttention(3, HEAD_SIZE)
    attention = DistributedAttention(NUM_HEADS, HEAD_SIZE, num_chunks=3)
    x = torch.randn(1, 2, NUM_HEADS, HEAD_SIZE)
    with pytest.raises(ValueError, match="num_chunks=3 must divide the 2 heads"):
        attention(x, x, x)
    with pytest.raises(ValueError, match=r"5 attention heads .* sp sizes that work: \[1, 5\]"):
        attention(*(torch.randn(1, 2, 5, HEAD_SIZE),) * 3)


def test_heads_not_divisible_by_sp_size_raise() -> None:
    run_on_ranks(_check_bad_head_counts, sp_size=2)


def test_valid_len_masks_padding_in_one_process() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 6, NUM_HEADS, HEAD_SIZE) for _ in range(3))
    out = DistributedAttention(NUM_HEADS, HEAD_SIZE)(q, k, v, valid_len=4)
    torch.testing.assert_close(out[:, :4], _sdpa(q[:, :4], k[:, :4], v[:, :4]), rtol=0, atol=TOL)
    assert not out[:, 4:].any()
