"""DistributedAttention (Ulysses) on two gloo processes against single-process SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from rank_launcher import assert_max_abs_diff, run_on_ranks

from fastvideo.attention import DistributedAttention
from fastvideo.attention.layer import HeadExchange
from fastvideo.distributed import get_sp_world_size, sequence_model_parallel_shard

# Each rank attends the same fp32 numbers per head as one process does; only the
# summation order inside the kernels may differ.
TOL = 1e-6
NUM_HEADS, HEAD_SIZE = 4, 8


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _sharded_inputs(seq_len: int, padded_len: int | None = None, batch: int = 2
                    ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """This rank's blocks of q, k, v zero-padded to `padded_len` (default: the next multiple
    of the sp size, as the model pads), and its block of single-process SDPA's output."""
    num_ranks = get_sp_world_size()
    torch.manual_seed(0)  # every rank builds the same full sequence
    q, k, v = (torch.randn(batch, seq_len, NUM_HEADS, HEAD_SIZE) for _ in range(3))
    padding = (-seq_len % num_ranks if padded_len is None else padded_len - seq_len)
    local = [sequence_model_parallel_shard(F.pad(x, (0, 0, 0, 0, 0, padding)), dim=1)
             for x in (q, k, v)]
    expected = sequence_model_parallel_shard(F.pad(_sdpa(q, k, v), (0, 0, 0, 0, 0, padding)), 1)
    return local, expected


def _check_matches_sdpa(seq_len: int, padded_len: int | None = None, batch: int = 2,
                        num_micro_batches: int = 2) -> None:
    local, expected = _sharded_inputs(seq_len, padded_len, batch)
    attention = DistributedAttention(NUM_HEADS, HEAD_SIZE, num_micro_batches=num_micro_batches)
    out = attention(*local, valid_len=seq_len)
    assert_max_abs_diff(out, expected, TOL)  # padding rows must come back zero


@pytest.mark.parametrize(("seq_len", "padded_len"), [
    (10, None),  # divides: 5 tokens per rank
    (7, None),  # padded to 8
    (2, 8),  # rank 1's block is all padding
])
def test_equals_single_process_sdpa(seq_len: int, padded_len: int | None) -> None:
    run_on_ranks(_check_matches_sdpa, seq_len, padded_len, sp_size=2)


@pytest.mark.parametrize(("batch", "num_micro_batches"), [
    (2, 1),  # the whole batch in one exchange per input
    (3, 2),  # uneven: items [0, 1) and [1, 3)
    (1, 2),  # capped at the batch size
])
def test_micro_batches_equal_single_process_sdpa(batch: int, num_micro_batches: int) -> None:
    run_on_ranks(_check_matches_sdpa, 7, None, batch, num_micro_batches, sp_size=2)


def _check_head_exchanges(seq_len: int) -> None:
    (q, k, v), expected = _sharded_inputs(seq_len)
    attention = DistributedAttention(NUM_HEADS, HEAD_SIZE)
    tensors_out = attention(q, k, v, valid_len=seq_len)
    # Started one at a time in the model's order (v, q, k), and mixed with a tensor.
    v_sent = attention.scatter_heads(v)
    q_sent = attention.scatter_heads(q)
    k_sent = attention.scatter_heads(k)
    assert all(isinstance(x, HeadExchange) for x in (q_sent, k_sent, v_sent))
    out = attention(q_sent, k_sent, v_sent, valid_len=seq_len)
    mixed = attention(q, attention.scatter_heads(k), attention.scatter_heads(v),
                      valid_len=seq_len)
    assert_max_abs_diff(out, expected, TOL)
    assert_max_abs_diff(out, tensors_out, TOL)
    assert_max_abs_diff(mixed, expected, TOL)


@pytest.mark.parametrize("seq_len", [10, 7])  # 7: padded to 8
def test_scatter_heads_equals_tensor_inputs(seq_len: int) -> None:
    run_on_ranks(_check_head_exchanges, seq_len, sp_size=2)


def _check_bad_exchanges() -> None:
    attention = DistributedAttention(NUM_HEADS, HEAD_SIZE)
    x = torch.randn(2, 2, NUM_HEADS, HEAD_SIZE)
    q = attention.scatter_heads(x)
    attention.num_micro_batches = 1
    with pytest.raises(ValueError, match=r"different micro-batches "
                                         r"\[\(0, 1, 2\), \(0, 2\), \(0, 2\)\]"):
        attention(q, x, x)
    with pytest.raises(ValueError, match=r"same \[B, S_local, H, D\] shape .*\(2, 3, 4, 8\)"):
        attention(attention.scatter_heads(x), x, torch.randn(2, 3, NUM_HEADS, HEAD_SIZE))
    attention.num_micro_batches = 0
    with pytest.raises(ValueError, match="num_micro_batches=0 must be >= 1"):
        attention(x, x, x)


def test_bad_exchanges_raise() -> None:
    run_on_ranks(_check_bad_exchanges, sp_size=2)


def _check_bad_head_counts() -> None:
    with pytest.raises(ValueError, match=r"3 attention heads .* sequence parallel size of 2; sp sizes that "
                                         r"work: \[1, 3\]"):
        DistributedAttention(3, HEAD_SIZE)
    attention = DistributedAttention(NUM_HEADS, HEAD_SIZE)
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


def test_one_process_scatter_heads_is_identity() -> None:
    q = torch.randn(1, 6, NUM_HEADS, HEAD_SIZE)
    assert DistributedAttention(NUM_HEADS, HEAD_SIZE).scatter_heads(q) is q  # nothing to send
    with pytest.raises(ValueError, match="num_micro_batches=0 must be >= 1"):
        DistributedAttention(NUM_HEADS, HEAD_SIZE, num_micro_batches=0)
