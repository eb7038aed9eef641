"""`MultiprocExecutor`: starts N worker processes and runs pipeline calls on all of them.

Workers are spawned (never forked: CUDA and forked processes do not mix), join one
process group, and each load the pipeline. The parent watches the workers' process
sentinels while it waits, so a worker that dies fails the call within a second with the
worker's exit code, and the others are killed: no call hangs in a collective and no
process is left behind.

When `num_gpus` exceeds `sp_size x tp_size`, the workers form several replicas of the
model and a batch of prompts is split across them (data parallelism): each replica makes
its share of the videos, and the results come back in prompt order.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import socket
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.forward_batch import ForwardBatch
from fastvideo.worker.data_parallel import item_ranges, merge_batches, split_batch
from fastvideo.worker.worker_process import READY, SHUTDOWN, worker_main

logger = logging.getLogger(__name__)

_ERROR_GRACE_S = 10.0


class WorkerError(RuntimeError):
    """A worker process failed or died; the message says which and why.

    `workers_usable` is True when every worker reported the same kind of failure and
    they are still in step (a rejected request), False when they had to be stopped.
    """

    def __init__(self, message: str, workers_usable: bool = False) -> None:
        super().__init__(message)
        self.workers_usable = workers_usable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MultiprocExecutor:
    def __init__(self, fastvideo_args: FastVideoArgs, startup_timeout_s: float = 600.0) -> None:
        self.fastvideo_args = fastvideo_args
        self.num_workers = fastvideo_args.num_gpus
        self.replica_size = fastvideo_args.sp_size * fastvideo_args.tp_size
        self.num_replicas = self.num_workers // self.replica_size
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
            self.shutdown(graceful=False)
            raise

    def forward(self, batch: ForwardBatch, timeout_s: float | None = None) -> ForwardBatch:
        """Run the pipeline on the workers; returns the finished batch.

        One replica: every worker runs `batch` and rank 0's result comes back. Several:
        each replica runs a contiguous share of the prompts (replicas beyond the number of
        prompts idle) and the shares are merged in prompt order."""
        if self.num_replicas == 1:
            parts = [batch]
        else:
            parts = [split_batch(batch, start, end)
                     for start, end in item_ranges(batch.batch_size, self.num_replicas)]
            if len(parts) < self.num_replicas:
                logger.info("%d prompt(s) for %d model replicas: %d replica(s) idle; pass "
                            "more prompts per call, or a larger sp_size for one video",
                            batch.batch_size, self.num_replicas,
                            self.num_replicas - len(parts))
        ranks = range(len(parts) * self.replica_size)
        for rank in ranks:
            self._conns[rank].send(parts[rank // self.replica_size])
        try:
            results = self._collect(timeout_s, expected="ok", ranks=ranks)
            if self.num_replicas == 1:
                return results[0]
            return merge_batches([results[r * self.replica_size] for r in range(len(parts))],
                                 batch)
        except WorkerError as e:
            if not e.workers_usable:
                # Survivors may be blocked in a collective with a dead worker: kill them.
                self.shutdown(graceful=False)
            raise
        except BaseException:
            self.shutdown(graceful=False)
            raise

    def _collect(self, timeout_s: float | None, expected: str,
                 ranks: range | None = None) -> dict[int, Any]:
        """Wait for one answer from each of `ranks` (default: every worker), by rank; raise
        `WorkerError` on a death (of any worker) or an error.

        When a worker reports an error, the others get a short grace period to report
        theirs: if all answer (e.g. every rank rejected the same bad request) the
        workers stay usable; otherwise some are stuck and the caller kills them.
        """
        results: dict[int, Any] = {}
        errors: dict[int, str] = {}
        sentinels = {proc.sentinel: rank for rank, proc in enumerate(self._procs)}
        ranks = range(self.num_workers) if ranks is None else ranks
        pending = {self._conns[rank]: rank for rank in ranks}
        while pending:
            wait_s = timeout_s if not errors else min(timeout_s or _ERROR_GRACE_S, _ERROR_GRACE_S)
            ready = wait(list(pending) + list(sentinels), timeout=wait_s)
            if not ready:
                if errors:
                    break
                raise WorkerError(f"workers {sorted(pending.values())} did not answer "
                                  f"within {timeout_s} s")
            # Messages first: a worker that reports an error and exits is not "died".
            for conn in [obj for obj in ready if obj in pending]:
                rank = pending.pop(conn)
                try:
                    status, payload = conn.recv()
                except EOFError:
                    raise self._died(rank) from None
                if status == "error":
                    errors[rank] = payload
                else:
                    assert status == expected, (status, expected)
                    results[rank] = payload
            for sentinel in [obj for obj in ready if obj in sentinels]:
                raise self._died(sentinels[sentinel])
        if errors:
            rank = min(errors)
            summary = errors[rank].strip().splitlines()[-1]
            raise WorkerError(f"worker {rank} failed: {summary}\n{errors[rank]}",
                              workers_usable=not pending)
        return results

    def _died(self, rank: int) -> WorkerError:
        proc = self._procs[rank]
        proc.join(1.0)
        return WorkerError(f"worker {rank} (pid {proc.pid}) died with exit code {proc.exitcode}; "
                           f"all {self.num_workers} workers are stopped")

    def shutdown(self, graceful: bool = True) -> None:
        """Stop the workers: politely (unless `graceful` is False), then by force.

        Safe to call twice."""
        for conn in self._conns if graceful else ():
            try:
                conn.send(SHUTDOWN)
            except (OSError, ValueError):
                pass
        for proc in self._procs if graceful else ():
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
