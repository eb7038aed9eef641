"""GPU slots of this node: which GPUs a job may use while other jobs run beside it.

A GPU node's process worker starts each GPU flow run as its own process, several at once
(up to its `--limit`, the node's GPU count). Each run takes `count` free slots before it
touches CUDA and sets `CUDA_VISIBLE_DEVICES` to them, so two runs never share a GPU; a run
that finds too few free waits for them. A slot is a lock file `gpu-<id>.lock` in the
node's worker folder (`worker_dir()`), held with `flock` for the run's life: the kernel
releases it when the process ends, however it ends (SIGKILL included), so a killed run
never leaves a slot taken. Slots are taken lowest id first, so a run finds the warm
worker an earlier run left on that GPU.

The node's GPUs are `FASTVIDEO_GPUS` (comma-separated device ids; on a machine without
GPUs, e.g. `0,1` to try the mechanism), else `CUDA_VISIBLE_DEVICES`, else those
`nvidia-smi -L` lists. With none there is nothing to share out and a run takes no slot.

    python -m fastvideo.jobs.gpu_slots                      # the slots and who holds them
    python -m fastvideo.jobs.gpu_slots --count 2 -- CMD...  # CMD on 2 free GPUs (waits)
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from fastvideo.jobs.node import worker_dir

GPUS_ENV = "FASTVIDEO_GPUS"


def node_gpus() -> list[str]:
    """The device ids of this node's GPUs (see the module docstring), [] if none."""
    given = os.environ.get(GPUS_ENV) or os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [g.strip() for g in given.split(",") if g.strip()]
    if shutil.which("nvidia-smi") is None:
        return []
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    lines = [line for line in listing.stdout.splitlines() if line.startswith("GPU ")]
    return [str(i) for i in range(len(lines))]


def _slot_path(gpu: str) -> Path:
    return worker_dir() / f"gpu-{gpu}.lock"


def _try_take(gpus: list[str], count: int) -> list[tuple[str, IO[str]]]:
    """`count` slots, lowest id first, or none (all or nothing, so no two runs each hold
    part of what both need)."""
    held: list[tuple[str, IO[str]]] = []
    for gpu in gpus:
        handle = open(_slot_path(gpu), "a+")  # noqa: SIM115 - held for the run's life
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        held.append((gpu, handle))
        if len(held) == count:
            return held
    for _, handle in held:
        handle.close()
    return []


@contextlib.contextmanager
def gpu_slots(count: int, log: Callable[[str], None] = print,
              poll_s: float = 0.5) -> Iterator[list[str]]:
    """Hold `count` free GPUs of this node (waiting for them) with CUDA_VISIBLE_DEVICES
    set to them; yields their ids ([] on a node without GPUs: nothing is held or set).
    Enter it before anything initialises CUDA in this process."""
    gpus = node_gpus()
    if not gpus:
        log("no GPUs on this node: the run takes no GPU slot")
        yield []
        return
    if not 1 <= count <= len(gpus):
        raise ValueError(f"a job asks for {count} GPUs; this node has {len(gpus)} "
                         f"({','.join(gpus)}, from ${GPUS_ENV}, CUDA_VISIBLE_DEVICES or "
                         f"nvidia-smi)")
    held = _try_take(gpus, count)
    if not held:
        log(f"waiting for {count} of the {len(gpus)} GPU slots of this node "
            f"({worker_dir()}) to be free")
        while not (held := _try_take(gpus, count)):
            time.sleep(poll_s)
    ids = [gpu for gpu, _ in held]
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
    log(f"GPU slot(s) {','.join(ids)} of {','.join(gpus)}: "
        f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']}")
    try:
        yield ids
    finally:
        if before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before
        for _, handle in held:
            handle.close()


def slot_holders() -> dict[str, int | None]:
    """GPU id -> pid of the process holding its slot (None: free)."""
    holders: dict[str, int | None] = {}
    for gpu in node_gpus():
        path = _slot_path(gpu)
        with open(path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                holders[gpu] = None
            except BlockingIOError:
                holders[gpu] = int(path.read_text() or 0) or None
    return holders


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastvideo.jobs.gpu_slots",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1, help="GPUs the command needs")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="-- CMD...: run it on free GPUs (none: list the slots)")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        holders = slot_holders()
        if not holders:
            print(f"no GPUs on this node (${GPUS_ENV}, CUDA_VISIBLE_DEVICES, nvidia-smi)")
        for gpu, pid in holders.items():
            print(f"gpu {gpu}: " + (f"held by pid {pid}" if pid else "free"))
        return 0
    with gpu_slots(args.count, log=lambda line: print(line, file=sys.stderr, flush=True)):
        return subprocess.run(command).returncode


if __name__ == "__main__":
    sys.exit(main())
