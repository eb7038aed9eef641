"""Parallel linear layers equal nn.Linear on the same full weights, on one and two processes."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from rank_launcher import assert_max_abs_diff, run_on_ranks
from torch import nn

from fastvideo.distributed import divide, get_tp_rank, get_tp_world_size
from fastvideo.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)

# fp32 throughout. A sharded layer sums the same products as nn.Linear but in another order
# (partial sums per rank, then the all-reduce), which moves O(1) outputs by a few ulp
# (~1e-7); a wrong slice moves them by O(1). So 1e-6 max abs diff.
TOL = 1e-6


def _reference(in_features: int, out_features: int, seed: int = 0) -> nn.Linear:
    """The same full layer on every rank (same seed); weights scaled so outputs are O(1)."""
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features)
    with torch.no_grad():
        linear.weight.normal_(std=in_features ** -0.5)
        linear.bias.normal_()
    return linear


def _load(layer: nn.Module, reference: nn.Linear, *shard_args: object) -> None:
    for name, param in layer.named_parameters():
        param.weight_loader(param, getattr(reference, name).detach(), *shard_args)


def _rank_block(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return x.chunk(get_tp_world_size(), dim=dim)[get_tp_rank()]


def _inputs(in_features: int) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, 5, in_features)


@torch.no_grad()
def _check_column(gather_output: bool) -> None:
    reference = _reference(16, 12)
    layer = ColumnParallelLinear(16, 12, gather_output=gather_output)
    _load(layer, reference)
    x = _inputs(16)
    expected = reference(x) if gather_output else _rank_block(reference(x))
    assert_max_abs_diff(layer(x), expected, TOL)


@torch.no_grad()
def _check_merged_column() -> None:
    output_sizes = [8, 4, 12]
    # Distinct seeds, so loading one part into another's place cannot pass.
    parts = [_reference(16, size, seed) for seed, size in enumerate(output_sizes)]
    x = _inputs(16)
    expected = torch.cat([_rank_block(part(x)) for part in parts], dim=-1)

    by_part = MergedColumnParallelLinear(16, output_sizes)
    for shard_id, part in enumerate(parts):
        _load(by_part, part, shard_id)
    assert_max_abs_diff(by_part(x), expected, TOL)

    fused = MergedColumnParallelLinear(16, output_sizes)
    _load(fused, _fuse(parts))
    assert torch.equal(fused.weight, by_part.weight) and torch.equal(fused.bias, by_part.bias)


def _fuse(parts: list[nn.Linear]) -> nn.Linear:
    """The checkpoint layout of a fused projection: the parts' rows stacked."""
    fused = nn.Linear(parts[0].in_features, sum(part.out_features for part in parts))
    fused.weight.copy_(torch.cat([part.weight for part in parts]))
    fused.bias.copy_(torch.cat([part.bias for part in parts]))
    return fused


@torch.no_grad()
def _check_qkv(total_num_kv_heads: int) -> None:
    head_size, num_heads, hidden = 4, 4, 16
    layer = QKVParallelLinear(hidden, head_size, num_heads, total_num_kv_heads)
    q, k, v = (_reference(hidden, n * head_size, seed)
               for seed, n in enumerate((num_heads, total_num_kv_heads, total_num_kv_heads)))
    for shard_id, reference in zip("qkv", (q, k, v)):
        _load(layer, reference, shard_id)
    x = _inputs(hidden)
    # A rank keeps whole heads; with fewer kv heads than ranks it keeps a replica of one.
    kv_block = get_tp_rank() // layer.num_kv_head_replicas
    local_kv = [y.chunk(total_num_kv_heads // layer.num_kv_heads, dim=-1)[kv_block]
                for y in (k(x), v(x))]
    expected = torch.cat([_rank_block(q(x)), *local_kv], dim=-1)
    assert_max_abs_diff(layer(x), expected, TOL)

    fused = QKVParallelLinear(hidden, head_size, num_heads, total_num_kv_heads)
    _load(fused, _fuse([q, k, v]))
    assert torch.equal(fused.weight, layer.weight) and torch.equal(fused.bias, layer.bias)


@torch.no_grad()
def _check_row(input_is_parallel: bool) -> None:
    reference = _reference(16, 12)
    layer = RowParallelLinear(16, 12, input_is_parallel=input_is_parallel)
    _load(layer, reference)
    x = _inputs(16)
    assert_max_abs_diff(layer(_rank_block(x) if input_is_parallel else x), reference(x), TOL)


@torch.no_grad()
def _check_column_row_chain() -> None:
    up, down = _reference(16, 32, seed=0), _reference(32, 16, seed=1)
    up_parallel = ColumnParallelLinear(16, 32)
    down_parallel = RowParallelLinear(32, 16, input_is_parallel=True)
    _load(up_parallel, up)
    _load(down_parallel, down)
    x = _inputs(16)
    # gelu is elementwise, so it runs on the sharded hidden without communication.
    assert_max_abs_diff(down_parallel(F.gelu(up_parallel(x))), down(F.gelu(up(x))), TOL)


# name -> (check function, its arguments)
CASES: dict[str, tuple[Any, ...]] = {
    "column": (_check_column, False),
    "column_gather_output": (_check_column, True),
    "merged_column": (_check_merged_column,),
    "qkv": (_check_qkv, 4),
    "qkv_grouped": (_check_qkv, 2),
    "qkv_kv_replicated": (_check_qkv, 1),
    "row_input_is_parallel": (_check_row, True),
    "row_full_input": (_check_row, False),
    "column_row_chain": (_check_column_row_chain,),
}


@pytest.mark.parametrize("case", CASES)
def test_on_two_ranks_equals_nn_linear(case: str) -> None:
    run_on_ranks(*CASES[case], tp_size=2)


@pytest.mark.parametrize("case", CASES)
def test_without_set_up_equals_nn_linear(uninitialised: None, case: str) -> None:
    check, *args = CASES[case]
    check(*args)


def _check_sizes_that_do_not_divide() -> None:
    with pytest.raises(ValueError, match="output_size of ColumnParallelLinear over the tensor "
                                         "parallel size: 5 is not divisible by 2"):
        ColumnParallelLinear(4, 5)
    with pytest.raises(ValueError, match="input_size of RowParallelLinear .* 5 is not divisible"):
        RowParallelLinear(5, 4)
    with pytest.raises(ValueError, match=r"output size 3 of MergedColumnParallelLinear \[4, 3\]"):
        MergedColumnParallelLinear(4, [4, 3])
    with pytest.raises(ValueError, match="total_num_heads of QKVParallelLinear"):
        QKVParallelLinear(12, 4, 3)


def test_sizes_that_do_not_divide_the_tp_size_raise() -> None:
    run_on_ranks(_check_sizes_that_do_not_divide, tp_size=2)


def test_divide() -> None:
    assert divide(12, 4) == 3
    with pytest.raises(ValueError, match="cannot split heads: 6 is not divisible by 4"):
        divide(6, 4, "heads")


def test_row_parallel_without_reduction_refuses_a_bias(uninitialised: None) -> None:
    with pytest.raises(ValueError, match="reduce_results=False cannot have a bias"):
        RowParallelLinear(8, 8, reduce_results=False)


@pytest.mark.parametrize("make", [lambda: ReplicatedLinear(8, 4), lambda: ColumnParallelLinear(8, 4),
                                  lambda: RowParallelLinear(8, 4)])
def test_weight_loader_names_mismatched_shapes(uninitialised: None, make) -> None:
    layer = make()
    with pytest.raises(ValueError, match=r"shape mismatch: parameter \(4, 8\), checkpoint \(4, 9\)"):
        layer.weight.weight_loader(layer.weight, torch.zeros(4, 9))


def test_merged_and_qkv_loaders_reject_unknown_shard_ids(uninitialised: None) -> None:
    merged = MergedColumnParallelLinear(8, [4, 4])
    with pytest.raises(ValueError, match="loaded_shard_id 2 out of range"):
        merged.weight_loader(merged.weight, torch.zeros(4, 8), 2)
    qkv = QKVParallelLinear(8, 2, 4)
    with pytest.raises(ValueError, match="'q', 'k' or 'v', got 'x'"):
        qkv.weight_loader(qkv.weight, torch.zeros(8, 8), "x")
