"""Process-group set-up: getters before and after set-up, group layout, bad sizes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from rank_launcher import run_on_ranks

from fastvideo.distributed import (
    destroy_model_parallel,
    get_sp_group,
    get_sp_rank,
    get_sp_world_size,
    get_tp_group,
    get_tp_rank,
    get_tp_world_size,
    get_world_group,
    init_distributed_environment,
    initialize_model_parallel,
    maybe_init_distributed_environment_and_model_parallel,
    model_parallel_is_initialized,
)

NOT_INITIALISED = (r"not initialised; call fastvideo\.distributed\.init_distributed_environment\(\)"
                   r" and initialize_model_parallel\(\) first")


@pytest.mark.parametrize("getter", [get_world_group, get_tp_group, get_sp_group])
def test_group_getters_fail_clearly_when_not_initialised(uninitialised: None, getter) -> None:
    with pytest.raises(RuntimeError, match=NOT_INITIALISED):
        getter()


def test_sizes_and_ranks_default_when_not_initialised(uninitialised: None) -> None:
    assert (get_tp_world_size(), get_tp_rank(), get_sp_world_size(), get_sp_rank()) == (1, 0, 1, 0)
    assert not model_parallel_is_initialized()


def test_initialize_model_parallel_needs_the_world_first(uninitialised: None) -> None:
    with pytest.raises(RuntimeError, match=NOT_INITIALISED):
        initialize_model_parallel(1, 1)


def test_import_initialises_neither_cuda_nor_torch_distributed() -> None:
    code = ("import torch, fastvideo.distributed, fastvideo.layers.linear, "
            "fastvideo.layers.vocab_parallel_embedding; "
            "assert not torch.distributed.is_initialized(); assert not torch.cuda.is_initialized()")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_world_of_one_outside_torchrun(world_of_one: None) -> None:
    assert model_parallel_is_initialized()
    assert dist.get_world_size() == 1 and dist.get_backend() == "gloo"
    for group in (get_world_group(), get_tp_group(), get_sp_group()):
        assert (group.world_size, group.rank_in_group, group.ranks) == (1, 0, [0])


def test_world_of_one_collectives_are_noops(world_of_one: None) -> None:
    x = torch.randn(2, 4, 3, 5)
    for group in (get_tp_group(), get_sp_group()):
        assert group.all_reduce(x) is x
        assert group.all_gather(x, dim=1) is x
        assert group.broadcast(x) is x


def test_maybe_init_is_idempotent_and_refuses_other_sizes(world_of_one: None) -> None:
    maybe_init_distributed_environment_and_model_parallel(1, 1)
    with pytest.raises(ValueError, match="already initialised with tp=1, sp=1; asked for tp=2"):
        maybe_init_distributed_environment_and_model_parallel(2, 1)


@pytest.mark.parametrize("tp_size, sp_size", [(2, 1), (1, 3), (0, 1)])
def test_sizes_that_do_not_divide_a_world_of_one_raise(world_of_one: None, tp_size: int,
                                                       sp_size: int) -> None:
    destroy_model_parallel()
    message = (rf"tensor_model_parallel_size={tp_size} x sequence_model_parallel_size={sp_size}"
               r" must divide the world size 1; \(tp, sp\) sizes that work: \[\(1, 1\)\]")
    with pytest.raises(ValueError, match=message):
        initialize_model_parallel(tp_size, sp_size)


def test_missing_torchrun_variables_raise(uninitialised: None,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="WORLD_SIZE is not set"):
        init_distributed_environment()


def _bad_sizes_on_two_ranks() -> None:
    for tp_size, sp_size in [(3, 1), (2, 2), (1, 4)]:
        with pytest.raises(ValueError, match=(
                rf"tensor_model_parallel_size={tp_size} x sequence_model_parallel_size={sp_size}"
                r" must divide the world size 2; \(tp, sp\) sizes that work: "
                r"\[\(1, 1\), \(1, 2\), \(2, 1\)\]")):
            initialize_model_parallel(tp_size, sp_size)
    assert not model_parallel_is_initialized()


def test_sizes_that_do_not_divide_two_ranks_raise() -> None:
    run_on_ranks(_bad_sizes_on_two_ranks, init_model_parallel=False)


def _check_tp2_sp2_mesh() -> None:
    rank = dist.get_rank()
    tp, sp = get_tp_group(), get_sp_group()
    # Mesh [sp, tp] = [[0, 1], [2, 3]]: tp groups are rows, sp groups are columns.
    assert tp.ranks == [rank - rank % 2, rank - rank % 2 + 1]
    assert sp.ranks == [rank % 2, rank % 2 + 2]
    assert (get_tp_rank(), get_sp_rank()) == (rank % 2, rank // 2)
    assert (get_tp_world_size(), get_sp_world_size(), get_world_group().world_size) == (2, 2, 4)

    x = torch.tensor([float(rank)])
    assert tp.all_reduce(x.clone()).item() == sum(tp.ranks)
    assert sp.all_reduce(x.clone()).item() == sum(sp.ranks)
    assert sp.all_gather(x, dim=0).tolist() == [float(r) for r in sp.ranks]
    assert tp.broadcast(x.clone(), src=1).item() == tp.ranks[1]


def test_tp_and_sp_groups_form_an_orthogonal_mesh() -> None:
    run_on_ranks(_check_tp2_sp2_mesh, world_size=4, tp_size=2, sp_size=2)


def _check_sp_only_world() -> None:
    assert get_tp_world_size() == 1 and get_tp_group().ranks == [dist.get_rank()]
    assert get_sp_group().ranks == [0, 1] and get_sp_rank() == dist.get_rank()


def test_sp_over_the_whole_world_leaves_tp_of_one() -> None:
    run_on_ranks(_check_sp_only_world, sp_size=2)
