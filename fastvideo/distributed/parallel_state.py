"""Process groups for tensor parallelism (tp) and sequence parallelism (sp).

Life cycle, once per process:

1. init:    ``init_distributed_environment()`` joins the world (reading the variables
            ``torchrun`` sets: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), then
            ``initialize_model_parallel(tensor_model_parallel_size, sequence_model_parallel_size)``
            splits the world into tp and sp groups.
            ``maybe_init_distributed_environment_and_model_parallel(tp_size, sp_size)`` does both,
            and makes a world of one process when not started by ``torchrun``.
2. use:     layers and attention ask ``get_tp_world_size()`` / ``get_sp_rank()`` ... and call the
            collectives of ``get_tp_group()`` / ``get_sp_group()`` (or the wrappers in
            ``communication_op``). Every collective is a no-op on a group of one process, and
            the size/rank getters answer 1 / 0 before any set-up, so a model runs in a single
            process without calling anything here.
3. destroy: ``destroy_model_parallel()`` drops the tp and sp groups,
            ``destroy_distributed_environment()`` also leaves the world.

Layout: the world is a mesh ``[dp, sp, tp]`` with tp innermost, so the ranks of a tp group are
adjacent (on one node they share the fastest links) and every tp group sees the same sequence
shard. Any factor left over (world / (tp * sp)) holds replicas of the model (dp); their
ranks are contiguous, and `VideoGenerator` gives each replica its own share of the prompts.

Importing this module initialises neither CUDA nor torch.distributed.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


class GroupCoordinator:
    """The processes of one parallel axis (world, tp or sp), as seen from this rank.

    torch.distributed requires every rank to take part in creating every group, so each
    rank builds all groups of the axis and keeps the one it belongs to.
    """

    def __init__(self, group_ranks: list[list[int]], name: str, backend: str,
                 device: torch.device) -> None:
        self.name = name
        self.backend = backend
        self.device = device
        self.rank = dist.get_rank()
        self.ranks: list[int] = []
        self.device_group: ProcessGroup | None = None
        for ranks in group_ranks:
            group = dist.new_group(ranks, backend=backend)
            if self.rank in ranks:
                self.ranks = list(ranks)
                self.device_group = group
        assert self.ranks, f"rank {self.rank} belongs to no {name} group in {group_ranks}"
        self.world_size = len(self.ranks)
        self.rank_in_group = self.ranks.index(self.rank)

    def start_all_to_all(self, x: torch.Tensor) -> tuple[torch.Tensor, dist.Work]:
        """Start sending block `x[j]` of `x` `[P, ...]` (any strides) to rank j; returns the
        receive tensor (block j from rank j) and a handle to `wait()` on before reading it.

        NCCL runs it on its own stream, so the caller's stream computes on meanwhile. (An
        all-to-all on the copy engines over symmetric memory, which leaves the SMs to
        compute, measured no faster on 4 H100s: benchmarks/RESULTS.md.)"""
        x = x.contiguous()
        out = torch.empty_like(x)
        return out, dist.all_to_all_single(out, x, group=self.device_group, async_op=True)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the group, in place (like vLLM), and return it."""
        if self.world_size == 1:
            return x
        dist.all_reduce(x, group=self.device_group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's `x` (all of the same shape) along `dim`, in rank order."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x, group=self.device_group)
        return torch.cat(parts, dim=dim)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Copy `x` from the group's rank `src` to every rank, in place, and return it."""
        if self.world_size == 1:
            return x
        dist.broadcast(x, src=self.ranks[src], group=self.device_group)
        return x

    def destroy(self) -> None:
        dist.destroy_process_group(self.device_group)

    def __repr__(self) -> str:
        return (f"GroupCoordinator(name={self.name!r}, ranks={self.ranks}, "
                f"rank_in_group={self.rank_in_group}, backend={self.backend!r})")


_WORLD: GroupCoordinator | None = None
_TP: GroupCoordinator | None = None
_SP: GroupCoordinator | None = None


def _not_initialised(what: str) -> RuntimeError:
    return RuntimeError(
        f"{what} group is not initialised; call fastvideo.distributed."
        "init_distributed_environment() and initialize_model_parallel() first")


def _from_env(name: str, given: int) -> int:
    if given != -1:
        return given
    if name not in os.environ:
        raise ValueError(f"{name} is not set and no value was passed; start the process with "
                         "torchrun or pass world_size, rank and local_rank")
    return int(os.environ[name])


def init_distributed_environment(world_size: int = -1, rank: int = -1, local_rank: int = -1,
                                 backend: str | None = None,
                                 init_method: str = "env://") -> None:
    """Join the world of processes; values left at -1 come from the torchrun variables.

    The backend defaults to NCCL when CUDA is available, gloo otherwise. On a GPU machine the
    current CUDA device becomes `local_rank`. If torch.distributed is already initialised, its
    world is adopted; a second call does nothing.
    """
    global _WORLD
    if _WORLD is not None:
        return
    if not dist.is_initialized():
        world_size = _from_env("WORLD_SIZE", world_size)
        rank = _from_env("RANK", rank)
        local_rank = int(os.environ.get("LOCAL_RANK", rank)) if local_rank == -1 else local_rank
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, init_method=init_method,
                                world_size=world_size, rank=rank)
    backend = dist.get_backend()
    device = (torch.device("cuda", torch.cuda.current_device()) if backend == "nccl"
              else torch.device("cpu"))
    _WORLD = GroupCoordinator([list(range(dist.get_world_size()))], "world", backend, device)


def _check_parallel_sizes(world_size: int, tp_size: int, sp_size: int) -> None:
    if tp_size >= 1 and sp_size >= 1 and world_size % (tp_size * sp_size) == 0:
        return
    divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
    valid = [(tp, sp) for tp in divisors for sp in divisors if world_size % (tp * sp) == 0]
    raise ValueError(
        f"tensor_model_parallel_size={tp_size} x sequence_model_parallel_size={sp_size} must "
        f"divide the world size {world_size}; (tp, sp) sizes that work: {valid}")


def initialize_model_parallel(tensor_model_parallel_size: int = 1,
                              sequence_model_parallel_size: int = 1) -> None:
    """Split the world into tp and sp groups (see the module docstring for the layout)."""
    global _TP, _SP
    world = get_world_group()
    if model_parallel_is_initialized():
        raise RuntimeError("model parallel groups are already initialised; "
                           "call destroy_model_parallel() first")
    tp_size, sp_size = tensor_model_parallel_size, sequence_model_parallel_size
    _check_parallel_sizes(world.world_size, tp_size, sp_size)
    mesh = torch.arange(world.world_size).reshape(-1, sp_size, tp_size)  # [dp, sp, tp]
    _TP = GroupCoordinator(mesh.reshape(-1, tp_size).tolist(), "tensor model parallel",
                           world.backend, world.device)
    _SP = GroupCoordinator(mesh.transpose(1, 2).reshape(-1, sp_size).tolist(),
                           "sequence model parallel", world.backend, world.device)


def maybe_init_distributed_environment_and_model_parallel(tp_size: int = 1,
                                                          sp_size: int = 1) -> None:
    """Set up whatever is missing: the world (one process when not under torchrun), then tp/sp.

    Safe to call again with the same sizes; call `destroy_distributed_environment()` when done.
    """
    if _WORLD is None:
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            init_distributed_environment()
        else:
            # Port 0: the store of a one-process world needs no known address.
            init_distributed_environment(world_size=1, rank=0, local_rank=0,
                                         init_method="tcp://127.0.0.1:0")
    if not model_parallel_is_initialized():
        initialize_model_parallel(tp_size, sp_size)
    elif (get_tp_world_size(), get_sp_world_size()) != (tp_size, sp_size):
        raise ValueError(
            f"model parallel is already initialised with tp={get_tp_world_size()}, "
            f"sp={get_sp_world_size()}; asked for tp={tp_size}, sp={sp_size}")


def get_world_group() -> GroupCoordinator:
    if _WORLD is None:
        raise _not_initialised("world")
    return _WORLD


def get_tp_group() -> GroupCoordinator:
    if _TP is None:
        raise _not_initialised("tensor model parallel")
    return _TP


def get_sp_group() -> GroupCoordinator:
    if _SP is None:
        raise _not_initialised("sequence model parallel")
    return _SP


def get_tp_world_size() -> int:
    """Size of this rank's tp group; 1 before set-up, so single-process models need none."""
    return 1 if _TP is None else _TP.world_size


def get_tp_rank() -> int:
    return 0 if _TP is None else _TP.rank_in_group


def get_sp_world_size() -> int:
    """Size of this rank's sp group; 1 before set-up, so single-process models need none."""
    return 1 if _SP is None else _SP.world_size


def get_sp_rank() -> int:
    return 0 if _SP is None else _SP.rank_in_group


def model_parallel_is_initialized() -> bool:
    return _TP is not None and _SP is not None


def destroy_model_parallel() -> None:
    global _TP, _SP
    for coordinator in (_TP, _SP):
        if coordinator is not None:
            coordinator.destroy()
    _TP = _SP = None


def destroy_distributed_environment() -> None:
    """Drop the tp/sp groups and leave the world; safe to call when nothing is set up."""
    global _WORLD
    destroy_model_parallel()
    if _WORLD is not None:
        _WORLD.destroy()
        _WORLD = None
    if dist.is_initialized():
        dist.destroy_process_group()
