"""`MultiprocExecutor`: starts N worker processes and runs pipeline calls on all of them.

Workers are spawned (never forked: CUDA and forked processes do not mix), join one
process group, and each load the pipeline. The parent watches the workers' process
sentinels while it waits, so a worker that dies fails the call within a second with the
worker's exit code, and the others are killed: no call hangs in a collective and no
process is left behind.
"""

from __future__ import annotations

import multiprocessing as mp
import socket
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.pipelines.pipeline_batch_info import ForwardBatch
from fastvideo.worker.worker_process import READY, SHUTDOWN, worker_main


class WorkerError(RuntimeError):
    """A worker process failed or died; the message says which and why."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MultiprocExecutor:
    def __init__(self, fastvideo_args: FastVideoArgs, startup_timeout_s: float = 600.0) -> None:
        self.fastvideo_args = fastvideo_args
        self.num_workers = fastvideo_args.num_gpus
        ctx = mp.get_context("spawn")
        port = _free_port()
        self._conns: list[Connection] = []
        self._procs: list[BaseProcess] = []
        for rank in range(self.num_workers):
            parent_conn, child_conn = ctx.Pipe()
            proc = ctx.Process(target=worker_main, name=f"fastvideo-worker-{rank}", daemon=True,
                               args=(rank, self.num_workers, port, fastvideo_args, child_conn,
                                     mp.current_process().pid))
            proc.start()
            child_conn.close()
            self._conns.append(parent_conn)
            self._procs.append(proc)
        try:
            self._collect(startup_timeout_s, expected=READY)
        except BaseException:
            self.shutdown()
            raise

    def forward(self, batch: ForwardBatch, timeout_s: float | None = None) -> ForwardBatch:
        """Run the pipeline on every worker; returns rank 0's finished batch."""
        for conn in self._conns:
            conn.send(batch)
        try:
            return self._collect(timeout_s, expected="ok")[0]
        except BaseException:
            self.shutdown()
            raise

    def _collect(self, timeout_s: float | None, expected: str) -> list[Any]:
        results: dict[int, Any] = {}
        sentinels = {proc.sentinel: rank for rank, proc in enumerate(self._procs)}
        pending = {conn: rank for rank, conn in enumerate(self._conns)}
        while pending:
            ready = wait(list(pending) + list(sentinels), timeout=timeout_s)
            if not ready:
                raise WorkerError(f"workers {sorted(pending.values())} did not answer "
                                  f"within {timeout_s} s")
            # Messages first: a worker that reports an error and exits is not "died".
            for conn in [obj for obj in ready if obj in pending]:
                rank = pending.pop(conn)
                status, payload = conn.recv()
                if status == "error":
                    raise WorkerError(f"worker {rank} failed:\n{payload}")
                assert status == expected, (status, expected)
                results[rank] = payload
            for sentinel in [obj for obj in ready if obj in sentinels]:
                proc = self._procs[sentinels[sentinel]]
                proc.join(0.1)
                raise WorkerError(
                    f"worker {sentinels[sentinel]} (pid {proc.pid}) died with exit code "
                    f"{proc.exitcode}; all {self.num_workers} workers are stopped")
        return [results[r] for r in range(self.num_workers)]

    def shutdown(self) -> None:
        """Stop the workers: politely, then by force. Safe to call twice."""
        for conn in self._conns:
            try:
                conn.send(SHUTDOWN)
            except (OSError, ValueError):
                pass
        for proc in self._procs:
            proc.join(timeout=5)
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        for conn in self._conns:
            conn.close()
        self._conns, self._procs = [], []

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def __del__(self) -> None:
        if self._procs:
            self.shutdown()
