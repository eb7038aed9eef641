"""Finding, starting and calling the warm worker of this node.

A warm worker (`fastvideo.entrypoints.warm_worker`) serves one model with one set of
engine options on one device, over a Unix socket in `worker_dir()`, named by a digest of
that spec: every caller on the node that asks for the same spec reaches the same process,
and the first one starts it. A worker outlives the process that started it and exits
after `idle_timeout_s` without a request.

    python -m fastvideo.jobs.worker_client list    # this node's warm workers
    python -m fastvideo.jobs.worker_client stop    # stop them all now

Messages are JSON lines. A call sends one request and reads events until `done` (its
payload is the answer) or `error`. A worker that dies mid-call closes the socket, so the
caller fails within a moment (`WorkerError`), with the end of the worker's log.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastvideo.jobs.node import WORKER_DIR_ENV, worker_dir
from fastvideo.jobs.options import EngineOptions

Event = dict[str, Any]


WARM_UP_OPTIONS = ("height", "width", "num_frames", "num_inference_steps", "guidance_scale",
                   "guidance_end", "max_sequence_length", "embedded_guidance_scale")
"""The request options that decide which compiled graphs and kernels a video uses."""


def warm_up_hints(options: dict[str, Any]) -> dict[str, Any]:
    """Of a run's request options, those shaping its videos, for a new worker's warm-up
    (`fastvideo.jobs.warm_up`); the ones not given are the model family's defaults."""
    return {name: options[name] for name in WARM_UP_OPTIONS if options.get(name) is not None}


class WorkerError(RuntimeError):
    """The warm worker could not be started, died, or failed the request."""


@dataclass(frozen=True)
class WorkerSpec:
    """What a warm worker serves: a model with engine options on a device."""

    model_path: str
    device: str
    dtype: str
    options: EngineOptions = EngineOptions()
    model_fingerprint: str | None = None
    """The model's fingerprint when the worker was asked for: a model replaced at the same
    path gets a new worker, never the one holding the old weights."""
    cuda_visible_devices: str | None = None
    """The GPUs this worker sees (its CUDA_VISIBLE_DEVICES; None: the starter's), resolved
    by the caller (`replica_gpus`): workers on different GPUs are different workers."""

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        doc = json.loads(text)
        return cls(**{**doc, "options": EngineOptions(**doc["options"])})


def replica_gpus(shard_index: int, num_replicas: int) -> str | None:
    """CUDA_VISIBLE_DEVICES of the worker a shard goes to from this process: this process's
    own GPUs, or with one replica per GPU (`num_replicas` > 1) GPU `shard_index % N` of
    them."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if num_replicas == 1:
        return visible
    gpus = visible.split(",") if visible else [str(i) for i in range(num_replicas)]
    return gpus[shard_index % num_replicas]


def worker_spec_for(model_path: str, device: str, dtype: str, options: EngineOptions,
                    num_replicas: int = 1, shard_index: int = 0,
                    fingerprint: str | None = None) -> WorkerSpec:
    """The worker that serves shard `shard_index` of a run with `num_replicas` workers on
    this node (`fingerprint`: the model's, computed here when not given)."""
    from fastvideo.storage import model_fingerprint

    return WorkerSpec(model_path=model_path, device=device, dtype=dtype, options=options,
                      model_fingerprint=fingerprint or model_fingerprint(Path(model_path)),
                      cuda_visible_devices=replica_gpus(shard_index, num_replicas))


def _paths(spec: WorkerSpec) -> tuple[Path, Path, Path]:
    stem = worker_dir() / f"w-{spec.digest[:16]}"
    return stem.with_suffix(".sock"), stem.with_suffix(".log"), stem.with_suffix(".lock")


def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        return sock
    except OSError:
        sock.close()
        return None


def _log_tail(log: Path, num_chars: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-num_chars:]
    except OSError:
        return "(no log)"


_CHILDREN: list[subprocess.Popen] = []
"""Workers this process started: kept so their exit status is collected (no zombies)."""

WAIT_NOTE_S = 30.0
"""How often a caller waiting for a loading worker hears that it still waits."""

SPAWNED_AT_ENV = "FASTVIDEO_WORKER_SPAWNED_AT"
"""Wall time a worker was spawned at, so its log can say what its start-up cost."""


def _alive(pid_file: Path) -> int | None:
    """The pid in `pid_file` if that process runs (a dead child of ours is reaped first,
    or it would look alive)."""
    for child in _CHILDREN:
        child.poll()
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def ensure_worker(spec: WorkerSpec, idle_timeout_s: float = 1800.0,
                  start_timeout_s: float = 1800.0, wait: bool = True,
                  on_wait: Callable[[str], None] | None = None,
                  warm_up: dict[str, Any] | None = None) -> Path:
    """The socket of the worker serving `spec`, started first if none is running.

    `wait=False` starts it and returns at once (the socket may not answer yet): a caller
    that knows it will need the worker lets it load while doing other work. `on_wait` hears
    what a wait for a loading worker is about: when it begins (with the worker's log), every
    `WAIT_NOTE_S` while it lasts (with the log's last line) and when the worker answers.
    `warm_up` (`warm_up_hints`): a worker started here runs the model once on a dummy
    request of that shape, before its first item.
    """
    sock_path, log, lock = _paths(spec)
    pid_file = sock_path.with_suffix(".pid")
    probe = _connect(sock_path)
    if probe is not None:
        probe.close()
        return sock_path
    with open(lock, "w") as lock_file:  # one starter per spec; the others wait, then connect
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        pid = _alive(pid_file)
        if pid is None:
            sock_path.unlink(missing_ok=True)  # a dead worker's socket
            pid = _spawn(spec, sock_path, log, idle_timeout_s, warm_up)
            pid_file.write_text(str(pid))
    if not wait:
        return sock_path
    started = time.monotonic()
    notes = 0
    while (probe := _connect(sock_path)) is None:
        if _alive(pid_file) is None:
            raise WorkerError(f"the warm worker for {spec.model_path} on {spec.device} exited "
                              f"while starting; its log ({log}) ends:\n{_log_tail(log)}")
        waited = time.monotonic() - started
        if waited > start_timeout_s:
            raise WorkerError(f"the warm worker did not start in {start_timeout_s:.0f} s; "
                              f"its log ({log}) ends:\n{_log_tail(log)}")
        if on_wait is not None and waited >= notes * WAIT_NOTE_S:
            if notes == 0:
                on_wait(f"waiting for the warm worker to load {spec.model_path} on "
                        f"{spec.device} (its log: {log})")
            else:
                last = _log_tail(log, 400).strip().splitlines()[-1:] or ["(nothing yet)"]
                on_wait(f"the warm worker is still loading after {waited:.0f} s; its log "
                        f"ends: {last[0]}")
            notes += 1
        time.sleep(0.2)
    probe.close()
    if on_wait is not None and notes:
        on_wait(f"the warm worker is ready after {time.monotonic() - started:.1f} s of waiting")
    return sock_path


def _spawn(spec: WorkerSpec, sock_path: Path, log: Path, idle_timeout_s: float,
           warm_up: dict[str, Any] | None = None) -> int:
    env = {**os.environ, SPAWNED_AT_ENV: repr(time.time())}
    if spec.cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = spec.cuda_visible_devices
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fastvideo.entrypoints.warm_worker", "--spec",
             spec.to_json(), "--socket", str(sock_path), "--idle-timeout-s",
             str(idle_timeout_s), *(["--warm-up", json.dumps(warm_up)] if warm_up is not None else [])],
            stdout=out, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)  # outlives this process and its process group
    _CHILDREN[:] = [p for p in _CHILDREN if p.poll() is None] + [proc]
    return proc.pid


def _events(sock: socket.socket) -> Iterator[Event]:
    with sock.makefile("rb") as stream:
        for line in stream:
            yield json.loads(line)


def call_worker(spec: WorkerSpec, request: dict[str, Any],
                on_event: Callable[[Event], None] | None = None,
                idle_timeout_s: float = 1800.0,
                on_wait: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Send `request` to the worker serving `spec` (started if needed, `on_wait` hearing
    about its load); every event goes to `on_event`; returns the `done` event's payload."""
    sock_path = ensure_worker(spec, idle_timeout_s, on_wait=on_wait)
    if not _answers(sock_path):  # it went idle and exited just now: start another
        sock_path = ensure_worker(spec, idle_timeout_s, on_wait=on_wait)
    return call_socket(sock_path, request, on_event)


def _answers(sock_path: Path) -> bool:
    probe = _connect(sock_path)
    if probe is None:
        return False
    probe.close()
    return True


def call_socket(sock_path: Path, request: dict[str, Any],
                on_event: Callable[[Event], None] | None = None) -> dict[str, Any]:
    """Send `request` to the worker listening on `sock_path` (see `call_worker`)."""
    sock = _connect(sock_path)
    if sock is None:
        raise WorkerError(f"the warm worker at {sock_path} stopped answering")
    with contextlib.closing(sock):
        sock.sendall(json.dumps(request).encode() + b"\n")
        for event in _events(sock):
            if event["event"] == "done":
                return event["payload"]
            if event["event"] == "error":
                raise WorkerError(f"the warm worker failed the request: {event['error']}")
            if on_event is not None:
                on_event(event)
    log = sock_path.with_suffix(".log")
    raise WorkerError(f"the warm worker at {sock_path} closed the connection mid-request (it "
                      f"died or was killed); its log ({log}) ends:\n{_log_tail(log)}")


def describe_worker(spec: WorkerSpec) -> dict[str, Any]:
    """The worker's pid, the pipelines it built, its engine settings and counters."""
    return call_worker(spec, {"kind": "describe"})


def running_workers(folder: Path | None = None) -> dict[int, Path]:
    """pid -> socket of every worker in `folder` (default `worker_dir()`) still alive."""
    alive = {}
    for pid_file in (folder or worker_dir()).glob("w-*.pid"):
        pid = _alive(pid_file)
        if pid is not None:
            alive[pid] = pid_file.with_suffix(".sock")
    return alive


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fastvideo.jobs.worker_client",
                                     description="This node's warm workers (in "
                                                 f"${WORKER_DIR_ENV} or {worker_dir()}).")
    parser.add_argument("command", choices=["list", "stop"])
    args = parser.parse_args(argv)
    for pid, sock in running_workers().items():
        if args.command == "stop":
            call_socket(sock, {"kind": "shutdown"})
            print(f"stopped worker {pid}")
            continue
        try:
            info = call_socket(sock, {"kind": "describe"})
        except WorkerError as exc:
            print(f"worker {pid}: {exc}")
            continue
        spec = info["spec"]
        gpus = spec.get("cuda_visible_devices")
        where = spec["device"] + (f" (CUDA_VISIBLE_DEVICES={gpus})" if gpus is not None else "")
        print(f"worker {pid} on {where}: {spec['model_path']} ({spec['dtype']}, "
              f"options {spec['options']}), {len(info['timeline']) // 2} items made; "
              f"log {sock.with_suffix('.log')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
