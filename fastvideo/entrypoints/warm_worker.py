"""The warm worker: one long-lived process per GPU that keeps its model loaded (and compiled)
and runs shard after shard, so no shard pays for a model load or a compile.

    python -m fastvideo.entrypoints.warm_worker --spec '<WorkerSpec JSON>' --socket PATH

Callers start it through `fastvideo.jobs.worker_client` (the first caller that needs it)
and talk to it over the Unix socket, one request per connection:

* `{"kind": "shard", "ctx": RunContext, "shard": Shard}`: every stage of the shard's
  items (`ShardRunner`: decoding and videos of one item overlap the next one's
  denoising); events per stage and per denoising step, then the results per stage;
* `{"kind": "denoise", "job": DenoiseJob}`: denoising only; events per step, then the
  outcomes;
* `{"kind": "describe"}`: pid, spec, the pipelines built, compile-cache counters, peak
  memory and lane times;
* `{"kind": "shutdown"}`.

With `--warm-up` (the run's video shape, passed by the command that starts it) a worker
that finds itself idle once loaded runs the model on a dummy request of that shape, in
pieces, until a request arrives (`fastvideo.jobs.warm_up`).

Requests from several callers queue on the one GPU lane in arrival order. A caller that
goes away cancels its items not yet started. The worker exits after `--idle-timeout-s`
without requests. It never touches Prefect: progress reaches the UI through the caller.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    # Before torch's and the engine's imports (seconds): CUDA's start runs beside them.
    from fastvideo.utils.cuda_prewarm import prewarm_from_argv

    _CUDA_PREWARM = prewarm_from_argv(sys.argv[1:])

import argparse
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from fastvideo.jobs.denoise import (
    DenoiseJob,
    DenoiseOutcome,
    denoise_stage,
    run_denoise_job,
)
from fastvideo.jobs.engine import ENGINE
from fastvideo.jobs.items import (
    RunContext,
    run_context_from_dict,
    shard_from_dict,
    to_jsonable,
)
from fastvideo.jobs.shard_runner import ShardRunner
from fastvideo.jobs.warm_up import warm_up_enabled, warm_up_pipeline
from fastvideo.jobs.worker_client import SPAWNED_AT_ENV, WorkerSpec
from fastvideo.pipelines.composed_pipeline_base import ComposedPipelineBase
from fastvideo.pipelines.phases import denoise_phase

logger = logging.getLogger("fastvideo.warm_worker")
T = TypeVar("T")
PROFILE_LOAD_ENV = "FASTVIDEO_PROFILE_LOAD"
"""A file path: the worker's load runs under cProfile, its stats written there and the top
functions logged (what a fresh worker's start-up spends its seconds on)."""
WARM_UP_GRACE_S = 0.5
"""How long a loaded worker waits for a request before warming up (a caller waiting for
its load polls every 0.2 s)."""


class _Connection:
    """One caller: events go out one whole line at a time; a broken pipe cancels."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self.gone = False

    def send(self, event: dict[str, Any]) -> None:
        if self.gone:
            return
        try:
            with self.lock:
                self.sock.sendall(json.dumps(event).encode() + b"\n")
        except OSError:
            self.gone = True  # the caller died or gave up: its items not started are skipped


class WarmWorker:
    def __init__(self, spec: WorkerSpec, warm_up: dict[str, Any] | None = None) -> None:
        self.spec = spec
        self.runner = ShardRunner(overlap=True)
        self.active = 0
        self.last_request = time.monotonic()
        self.state_lock = threading.Lock()
        self.stop = threading.Event()
        start = time.perf_counter()
        self.pipeline = _profiled(self._load, os.environ.get(PROFILE_LOAD_ENV))
        self.load_s = time.perf_counter() - start
        self.compile_logged_s = 0.0
        self.warm_up: dict[str, Any] | None = None
        self.warm_up_hints = warm_up if warm_up is not None and warm_up_enabled() else None
        self.request_arrived = threading.Event()
        """Set by the first shard or denoise request: a warm-up stops for it."""

    def _warm_up(self, hints: dict[str, Any]) -> None:
        """On the GPU lane, once the socket answers: if no request comes within
        `WARM_UP_GRACE_S` (a caller waiting for the load connects at once), warm up in
        pieces until one does."""
        if self.request_arrived.wait(WARM_UP_GRACE_S):
            self.warm_up = {"skipped": "a request was waiting"}
            logger.info("warm-up skipped: a request was waiting")
            return
        try:
            self.warm_up = warm_up_pipeline(self.pipeline, hints, self.request_arrived.is_set)
        except Exception as exc:  # the first item then pays its first calls, as without
            logger.warning("warm-up failed, so the first item makes the first calls: %s: %s",
                           type(exc).__name__, exc)
            self.warm_up = {"error": f"{type(exc).__name__}: {exc}"}
            return
        stopped = self.warm_up["stopped_before"]
        logger.info("warm-up on a dummy request (%s frames x %sx%s, DiT at steps %s of "
                    "%s): %.1f s%s", *self.warm_up["shape"], self.warm_up["dit_steps"],
                    self.warm_up["steps"], self.warm_up["seconds"],
                    f", stopped before {stopped} for a request" if stopped else "")
        self._log_compiling()

    def _load(self) -> ComposedPipelineBase:
        """Every module of the model, once: each request's stages reuse them."""
        # Each part's time goes to the log: this is a fresh process's first video's
        # critical path (benchmarks/RESULTS.md, "Bulk generation on one GPU").
        marks = [("start", time.perf_counter())]
        from fastvideo.models.loader.weight_utils import prefetch_model_files

        asked = prefetch_model_files(self.spec.model_path)
        logger.info("reading %.2f GB of weights in the background", asked / 1e9)
        if self.spec.device.startswith("cuda"):
            torch.cuda.set_device(self.spec.device if ":" in self.spec.device else 0)
            torch.cuda.init()
            marks.append(("CUDA", time.perf_counter()))
        from fastvideo.pipelines.builder import build_pipeline

        args = self.spec.options.to_args(self.spec.model_path, self.spec.device, self.spec.dtype)
        # Our own modules (text encoder, DiT) built on a thread beside the libraries' imports.
        reading = ENGINE.preload(args)
        if reading:
            logger.info("reading %s ahead on a thread", ", ".join(reading))
        stages = list(build_pipeline(args, required_modules=()).stages)
        marks.append(("the pipeline's imports", time.perf_counter()))
        pipeline = ENGINE.options_pipeline(self.spec.model_path, self.spec.options,
                                       self.spec.device, self.spec.dtype, stages)
        if self.spec.device.startswith("cuda"):
            torch.cuda.synchronize()  # the lanes' own streams read these weights
        marks.append(("the modules", time.perf_counter()))
        logger.info("load: %s", ", ".join(f"{name} {end - begin:.2f} s" for (_, begin), (name, end)
                                          in zip(marks, marks[1:])))
        return pipeline

    def describe(self) -> dict[str, Any]:
        from fastvideo.attention.layer import attention_backends_in_use
        from fastvideo.models.compile_cache import compile_cache_stats, compile_seconds

        transformer = self.pipeline.get_module("transformer")
        cuda = self.spec.device.startswith("cuda")
        return {
            "pid": os.getpid(), "spec": json.loads(self.spec.to_json()),
            "load_s": self.load_s, "builds": ENGINE.builds,
            "fastvideo_args": to_jsonable(self.pipeline.fastvideo_args),
            "attention_backends": attention_backends_in_use(transformer),
            "compiled_blocks": sum(hasattr(m, "_compiled_call_impl") and
                                   m._compiled_call_impl is not None
                                   for m in transformer.modules()),
            "batch_cfg": getattr(self._denoise_stage(), "batch_cfg", None),
            "warm_up": self.warm_up,
            "sta": getattr(self._denoise_stage(), "sta_config", None) is not None,
            "phases": [p.to_dict() for p in self.pipeline.phases],
            "compile_cache": compile_cache_stats(),
            "compile_s": compile_seconds(),
            "timeline": self.runner.timeline.as_list(),
            "peak_memory_gib": (torch.cuda.max_memory_allocated() / 2**30) if cuda else None,
        }

    def _denoise_stage(self) -> Any:
        return denoise_stage(self.pipeline, denoise_phase(self.pipeline.phases))

    def _context(self, doc: dict[str, Any]) -> RunContext:
        """The request's run context, on this worker's device (its model and options)."""
        ctx = run_context_from_dict(doc)
        mine = (self.spec.model_path, self.spec.model_fingerprint, self.spec.options)
        if (ctx.model_path, ctx.model_fingerprint, ctx.options) != mine:
            raise ValueError(f"this worker serves {mine}, not {ctx.model_path} "
                             f"({ctx.model_fingerprint}) with {ctx.options}")
        return replace(ctx, device=self.spec.device, dtype=self.spec.dtype,
                       denoise_device=self.spec.device, denoise_dtype=self.spec.dtype)

    def handle(self, conn: _Connection, request: dict[str, Any]) -> None:
        kind = request.get("kind")
        if kind == "describe":
            payload: Any = self.describe()
        elif kind == "shutdown":
            self.stop.set()
            payload = {"pid": os.getpid()}
        elif kind == "shard":
            self.request_arrived.set()
            results = self.runner.run(self._context(request["ctx"]),
                                      shard_from_dict(request["shard"]), conn.send,
                                      cancelled=lambda: conn.gone)
            payload = to_jsonable(results)
        elif kind == "denoise":
            self.request_arrived.set()
            job = DenoiseJob.from_json(json.dumps(request["job"]).encode())
            payload = to_jsonable(self._denoise(job, conn))
        else:
            raise ValueError(f"unknown request kind {kind!r}; known: shard, denoise, "
                             "describe, shutdown")
        if kind in ("shard", "denoise"):
            self._log_compiling()
        conn.send({"event": "done", "payload": payload})

    def _log_compiling(self) -> None:
        """After a request that compiled: how long compiling took so far and where it went,
        so the log says what this process's first calls paid on top of computing."""
        from fastvideo.models.compile_cache import compile_seconds

        seconds = compile_seconds()
        with self.state_lock:
            if seconds["total"] <= self.compile_logged_s:
                return
            self.compile_logged_s = seconds["total"]
        logger.info("torch.compile so far: %s",
                    ", ".join(f"{name} {value:.2f} s" for name, value in seconds.items()))

    def _denoise(self, job: DenoiseJob, conn: _Connection) -> list[DenoiseOutcome]:
        def on_progress(item_id: str, step: int, total: int) -> None:
            conn.send({"event": "step", "item_id": item_id, "step": step, "total": total})

        stages = denoise_phase(self.pipeline.phases).stages
        pipeline = ENGINE.options_pipeline(self.spec.model_path, self.spec.options,
                                       self.spec.device, self.spec.dtype, stages)

        def work() -> list[DenoiseOutcome]:
            with ENGINE.stage_lock(pipeline, stages):
                return run_denoise_job(replace(job, device=self.spec.device,
                                               dtype=self.spec.dtype), pipeline, on_progress)

        return self.runner.on_gpu_lane(work)

    def serve_connection(self, sock: socket.socket) -> None:
        conn = _Connection(sock)
        with self.state_lock:
            self.active += 1
        try:
            with sock.makefile("rb") as stream:
                line = stream.readline()
            if line:
                self.handle(conn, json.loads(line))
        except Exception as exc:
            logger.exception("request failed")
            conn.send({"event": "error", "error": f"{type(exc).__name__}: {exc}"})
        finally:
            sock.close()
            with self.state_lock:
                self.active -= 1
                self.last_request = time.monotonic()

    def serve(self, sock_path: Path, idle_timeout_s: float) -> None:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        tmp = sock_path.with_name(f"{sock_path.name}.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        server.bind(str(tmp))
        os.chmod(tmp, 0o600)
        server.listen(64)
        server.settimeout(1.0)
        inode = tmp.stat().st_ino
        pid_file = sock_path.with_suffix(".pid")
        pid_file.write_text(str(os.getpid()))  # its starter wrote it too; a hand start did not
        tmp.replace(sock_path)  # callers see the socket only once it accepts
        logger.info("ready: %s on %s, loaded in %.1f s, socket %s", self.spec.model_path,
                    self.spec.device, self.load_s, sock_path)
        if self.warm_up_hints is not None:
            hints = self.warm_up_hints
            self.runner.submit_on_gpu_lane(lambda: self._warm_up(hints))
        try:
            while not self.stop.is_set():
                try:
                    client, _ = server.accept()
                except TimeoutError:
                    with self.state_lock:
                        idle = self.active == 0 and \
                            time.monotonic() - self.last_request > idle_timeout_s
                    if idle:
                        logger.info("idle for %.0f s: exiting", idle_timeout_s)
                        break
                    continue
                threading.Thread(target=self.serve_connection, args=(client,),
                                 daemon=True).start()
        finally:
            if sock_path.exists() and sock_path.stat().st_ino == inode:  # not a successor's
                sock_path.unlink(missing_ok=True)
                pid_file.unlink(missing_ok=True)
            server.close()
            self.runner.close()


def _profiled(load: Callable[[], T], stats_path: str | None) -> T:
    """`load()`, under cProfile when `stats_path` is given (a diagnosis: it slows
    Python-heavy work by up to ~2x)."""
    if not stats_path:
        return load()
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    result = profiler.runcall(load)
    profiler.dump_stats(stats_path)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(40)
    logger.info("the load under cProfile (%s):\n%s", stats_path, text.getvalue())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="WorkerSpec as JSON")
    parser.add_argument("--socket", required=True, type=Path)
    parser.add_argument("--idle-timeout-s", type=float, default=1800.0)
    parser.add_argument("--warm-up", type=json.loads, metavar="JSON",
                        help="request options shaping the run's videos: run the model once "
                             "on a dummy request of that shape before the first item "
                             "(fastvideo.jobs.warm_up)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format=f"%(asctime)s worker {os.getpid()} %(levelname)s %(name)s: "
                               "%(message)s")
    spawned_at = os.environ.get(SPAWNED_AT_ENV)
    if spawned_at:
        spawned = float(spawned_at)
        logger.info("started %.2f s after its spawn at %s.%03d (Python's imports)",
                    time.time() - spawned, time.strftime("%H:%M:%S", time.localtime(spawned)),
                    int(spawned % 1 * 1000))
    prewarm = globals().get("_CUDA_PREWARM")  # set when run as a program
    if prewarm is not None:
        logger.info(prewarm.wait(timeout=120))
    worker = WarmWorker(WorkerSpec.from_json(args.spec), warm_up=args.warm_up)
    worker.serve(args.socket, args.idle_timeout_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
