"""The collectives of fastvideo.distributed.communication_op, on one and on two processes."""

from __future__ import annotations

import pytest
import torch
from rank_launcher import run_on_ranks

from fastvideo.distributed import (
    get_sp_rank,
    get_sp_world_size,
    get_tp_rank,
    sequence_model_parallel_all_gather,
    sequence_model_parallel_shard,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)

OPS = [tensor_model_parallel_all_reduce, tensor_model_parallel_all_gather,
       sequence_model_parallel_all_gather, sequence_model_parallel_shard]


@pytest.mark.parametrize("op", OPS)
def test_ops_are_noops_without_set_up(uninitialised: None, op) -> None:
    x = torch.randn(2, 4, 6, 3)
    assert op(x) is x


@pytest.mark.parametrize("op", OPS)
def test_ops_are_noops_in_a_world_of_one(world_of_one: None, op) -> None:
    x = torch.randn(2, 4, 6, 3)
    assert op(x) is x


def _check_sp_shard_and_gather() -> None:
    num_ranks, rank = get_sp_world_size(), get_sp_rank()
    torch.manual_seed(0)  # every rank builds the same full tensor as its reference
    x_full = torch.randn(2, 8, 6, 3)  # [B, S, H, D]
    x_seq = x_full.chunk(num_ranks, dim=1)[rank]
    # Data is only moved, never computed on, so the match is exact.
    assert torch.equal(sequence_model_parallel_shard(x_full, dim=1), x_seq)
    assert torch.equal(sequence_model_parallel_all_gather(x_seq, dim=1), x_full)


def test_sp_shard_and_all_gather_are_inverse() -> None:
    run_on_ranks(_check_sp_shard_and_gather, sp_size=2)


def _check_tp_collectives() -> None:
    rank = get_tp_rank()
    x = torch.full((2, 3), float(rank + 1))
    gathered = tensor_model_parallel_all_gather(x, dim=-1)
    assert torch.equal(gathered, torch.cat([torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)], -1))
    assert torch.equal(tensor_model_parallel_all_reduce(x.clone()), torch.full((2, 3), 3.0))


def test_tp_all_reduce_and_all_gather() -> None:
    run_on_ranks(_check_tp_collectives, tp_size=2)
