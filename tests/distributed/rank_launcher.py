"""Run a test function on several CPU processes joined with gloo, like `torchrun` would.

Worker functions must live at module level in a test module (spawned processes import them
by name). They run after the world and the tp/sp groups are set up, and the groups are torn
down afterwards whether they pass or fail.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

from fastvideo.distributed import (
    destroy_distributed_environment,
    init_distributed_environment,
    initialize_model_parallel,
)

# Each test must stay under 30 s; a hung collective is killed well before pytest would hang.
DEFAULT_TIMEOUT_S = 25.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_max_abs_diff(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs().max().item()
    assert diff <= tol, f"max abs diff {diff:.3e} > {tol:.0e}"


def _rank_entry(rank: int, fn: Callable[..., None], args: tuple[Any, ...], world_size: int,
                port: int, parallel_sizes: tuple[int, int] | None) -> None:
    # The variables torchrun sets, so the env:// path of init_distributed_environment runs.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # several processes share the machine's cores
    init_distributed_environment(backend="gloo")
    try:
        if parallel_sizes is not None:
            initialize_model_parallel(*parallel_sizes)
        fn(*args)
    finally:
        destroy_distributed_environment()


def run_on_ranks(fn: Callable[..., None], *args: Any, world_size: int = 2, tp_size: int = 1,
                 sp_size: int = 1, init_model_parallel: bool = True,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Call `fn(*args)` on `world_size` processes; re-raise the first failure here.

    With `init_model_parallel=False` only the world is set up (to test
    `initialize_model_parallel` itself).
    """
    sizes = (tp_size, sp_size) if init_model_parallel else None
    # A fork server imports torch once per session and forks each rank from that clean,
    # single-threaded process: ~10x faster than "spawn", and safe where forking the test
    # process (which may hold threads and locks) would not be.
    mp.set_forkserver_preload(["torch", "pytest", __name__])
    context = mp.start_processes(_rank_entry, args=(fn, args, world_size, free_port(), sizes),
                                 nprocs=world_size, join=False, start_method="forkserver")
    deadline = time.monotonic() + timeout_s
    try:
        # join() returns True once all exited, and raises (killing the rest) if one failed.
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{fn.__name__} did not finish on {world_size} ranks "
                                   f"within {timeout_s} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join()
