"""The loop each worker process runs: join the process groups, load, serve forward calls.

Every rank of a model replica runs the same pipeline on the same batch (SPMD); the
layers and `DistributedAttention` split the work. The replica's first rank sends the
finished batch back.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import traceback
from multiprocessing.connection import Connection

import torch

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.forward_batch import ForwardBatch

READY = "ready"
SHUTDOWN = "shutdown"


def _exit_when_parent_dies(parent_pid: int) -> None:
    # A worker must not outlive its parent, even one killed with SIGKILL.
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)
        time.sleep(0.5)


def _to_cpu(batch: ForwardBatch) -> ForwardBatch:
    for f in dataclasses.fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, torch.Tensor):
            setattr(batch, f.name, value.cpu())
    return batch


def worker_main(rank: int, world_size: int, master_port: int, fastvideo_args: FastVideoArgs,
                conn: Connection, parent_pid: int) -> None:
    threading.Thread(target=_exit_when_parent_dies, args=(parent_pid,), daemon=True).start()
    from fastvideo.distributed import parallel_state as ps
    from fastvideo.pipelines.builder import build_pipeline

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    try:
        if fastvideo_args.device.startswith("cuda"):
            fastvideo_args = dataclasses.replace(fastvideo_args, device=f"cuda:{rank}")
        ps.init_distributed_environment()
        ps.initialize_model_parallel(fastvideo_args.tp_size, fastvideo_args.sp_size)
        pipeline = build_pipeline(fastvideo_args)
        # The first rank of each model replica sends its finished batch back.
        leader = ps.get_sp_rank() == 0 and ps.get_tp_rank() == 0
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send((READY, None))
    try:
        while True:
            message = conn.recv()
            if message == SHUTDOWN:
                break
            try:
                batch = pipeline.forward(message, fastvideo_args)
                conn.send(("ok", _to_cpu(batch) if leader else None))
            except Exception:
                conn.send(("error", traceback.format_exc()))
    finally:
        ps.destroy_distributed_environment()
