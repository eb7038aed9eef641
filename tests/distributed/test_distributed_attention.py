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


def _check_matches_sdpa(seq_len: int, num_chunks: int, num_query_chunks: int = 1,
                        padded_len: int | None = None, batch: int = 2,
                        num_micro_batches: int = 2) -> None:
    local, expected = _sharded_inputs(seq_len, padded_len, batch)
    attention = DistributedAttention(NUM_HEADS, HEAD_SIZE, num_chunks=num_chunks,
                                     num_query_chunks=num_query_chunks,
                                     num_micro_batches=num_micro_batches)
    out = attention(*local, valid_len=seq_len)
    assert_max_abs_diff(out, expected, TOL)  # padding rows must come back zero


@pytest.mark.parametrize(("seq_len", "num_chunks"), [
    (10, 1),  # divides: 5 tokens per rank; one chunk, i.e. plain Ulysses
    (10, 2),  # 2 chunks of 1 head per rank, pipelined
    (7, 2),  # padded to 8
])
def test_equals_single_process_sdpa(seq_len: int, num_chunks: int) -> None:
    run_on_ranks(_check_matches_sdpa, seq_len, num_chunks, sp_size=2)


@pytest.mark.parametrize(("seq_len", "num_chunks", "num_query_chunks", "padded_len"), [
    (10, 1, 2, None),  # 5 rows per rank: uneven query chunks of 2 and 3 rows
    (7, 1, 2, None),  # padded to 8: the one padding token is in chunk 1 (rank 1's last row)
    (7, 2, 2, None),  # head chunks and query chunks together
    (12, 1, 3, None),  # 3 chunks of 2 rows per rank
    (3, 1, 2, 8),  # chunk 1 has one real row (token 2 of rank 0)
    (2, 1, 2, 8),  # chunk 1 is all padding
    (10, 1, 8, None),  # more chunks than the 5 rows per rank: one row each
])
def test_query_chunks_equal_single_process_sdpa(seq_len: int, num_chunks: int,
                                                num_query_chunks: int,
                                                padded_len: int | None) -> None:
    run_on_ranks(_check_matches_sdpa, seq_len, num_chunks, num_query_chunks, padded_len,
                 sp_size=2)


@pytest.mark.parametrize(("batch", "num_micro_batches", "num_chunks", "num_query_chunks"), [
    (2, 1, 1, 1),  # the whole batch in one exchange per input
    (2, 2, 1, 1),  # one item per micro-batch (classifier-free guidance's pair)
    (3, 2, 1, 1),  # uneven: items [0, 1) and [1, 3)
    (3, 3, 2, 2),  # with head and query chunks inside each micro-batch
    (1, 2, 1, 1),  # capped at the batch size
])
def test_micro_batches_equal_single_process_sdpa(batch: int, num_micro_batches: int,
                                                 num_chunks: int, num_query_chunks: int) -> None:
    run_on_ranks(_check_matches_sdpa, 7, num_chunks, num_query_chunks, None, batch,
                 num_micro_batches, sp_size=2)


def _check_packed_inputs(seq_len: int, num_chunks: int, num_query_chunks: int, batch: int,
                         num_micro_batches: int) -> None:
    import fastvideo.attention.layer as layer

    (q, k, v), expected = _sharded_inputs(seq_len, batch=batch)
    attention = DistributedAttention(NUM_HEADS, HEAD_SIZE, num_chunks=num_chunks,
                                     num_query_chunks=num_query_chunks,
                                     num_micro_batches=num_micro_batches, pack_inputs=True)
    assert attention.scatter_heads(q) is q  # forward sends all three at once
    sent = []
    unpatched = layer._all_to_all
    layer._all_to_all = lambda x, group: sent.append(tuple(x.shape)) or unpatched(x, group)
    try:
        out = attention(attention.scatter_heads(q), attention.scatter_heads(k),
                        attention.scatter_heads(v), valid_len=seq_len)
    finally:
        layer._all_to_all = unpatched
    assert_max_abs_diff(out, expected, TOL)
    parts = min(num_micro_batches, batch) * num_chunks
    packed = [shape for shape in sent if len(shape) == 6]
    # One message of the three inputs per micro-batch and head chunk, then the outputs.
    assert len(packed) == parts and all(shape[3] == 3 for shape in packed)
    assert len(sent) == parts + parts * num_query_chunks


@pytest.mark.parametrize(("seq_len", "num_chunks", "num_query_chunks", "batch",
                          "num_micro_batches"), [
    (10, 1, 1, 1, 2),  # one item: the received sequence is a view of the message
    (7, 1, 1, 1, 2),  # padded to 8
    (7, 1, 1, 2, 2),  # two micro-batches, a message each
    (7, 2, 2, 3, 2),  # with head and query chunks
    (10, 1, 2, 2, 1),  # two items in one message
])
def test_packed_inputs_equal_single_process_sdpa(seq_len: int, num_chunks: int,
                                                 num_query_chunks: int, batch: int,
                                                 num_micro_batches: int) -> None:
    run_on_ranks(_check_packed_inputs, seq_len, num_chunks, num_query_chunks, batch,
                 num_micro_batches, sp_size=2)


def _check_head_exchanges(seq_len: int, num_chunks: int, num_query_chunks: int) -> None:
    (q, k, v), expected = _sharded_inputs(seq_len)
    attention = DistributedAttention(NUM_HEADS, HEAD_SIZE, num_chunks=num_chunks,
                                     num_query_chunks=num_query_chunks)
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


@pytest.mark.parametrize(("seq_len", "num_chunks", "num_query_chunks"), [
    (10, 1, 1),
    (7, 1, 1),  # padded to 8
    (7, 1, 2),
    (7, 2, 1),  # each handle carries one exchange per head chunk
    (7, 2, 2),
])
def test_scatter_heads_equals_tensor_inputs(seq_len: int, num_chunks: int,
                                            num_query_chunks: int) -> None:
    run_on_ranks(_check_head_exchanges, seq_len, num_chunks, num_query_chunks, sp_size=2)


def _check_bad_exchanges() -> None:
    attention = DistributedAttention(NUM_HEADS, HEAD_SIZE)
    x = torch.randn(1, 2, NUM_HEADS, HEAD_SIZE)
    q = attention.scatter_heads(x)
    attention.num_chunks = 2
    with pytest.raises(ValueError, match=r"different head chunks or micro-batches "
                                         r"\[\(1, \(0, 1\)\), \(2, \(0, 1\)\), \(2, \(0, 1\)\)\]"):
        attention(q, x, x)
    attention.num_chunks = 1
    with pytest.raises(ValueError, match=r"same \[B, S_local, H, D\] shape .*\(1, 3, 4, 8\)"):
        attention(attention.scatter_heads(x), x, torch.randn(1, 3, NUM_HEADS, HEAD_SIZE))
    attention.num_query_chunks = 0
    with pytest.raises(ValueError, match="num_query_chunks=0 must be >= 1"):
        attention(x, x, x)
    attention.num_query_chunks, attention.num_micro_batches = 1, 0
    with pytest.raises(ValueError, match="num_micro_batches=0 must be >= 1"):
        attention(x, x, x)


def test_bad_exchanges_raise() -> None:
    run_on_ranks(_check_bad_exchanges, sp_size=2)


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


def test_one_process_scatter_heads_is_identity_and_query_chunks_mask_padding() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 6, NUM_HEADS, HEAD_SIZE) for _ in range(3))
    attention = DistributedAttention(NUM_HEADS, HEAD_SIZE, num_query_chunks=2)
    assert attention.scatter_heads(q) is q  # nothing to send, nothing allocated
    out = attention(q, k, v, valid_len=4)
    torch.testing.assert_close(out[:, :4], _sdpa(q[:, :4], k[:, :4], v[:, :4]), rtol=0, atol=TOL)
    assert not out[:, 4:].any()
    with pytest.raises(ValueError, match="num_query_chunks=0 must be >= 1"):
        DistributedAttention(NUM_HEADS, HEAD_SIZE, num_query_chunks=0)
