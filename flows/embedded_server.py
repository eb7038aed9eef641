"""Prefect's embedded API server, started as a command's first act.

Without a configured API (`PREFECT_API_URL`), Prefect starts a temporary server for the run
(`SubprocessASGIServer`: uvicorn in a subprocess, its database under `PREFECT_HOME`) when
the flow first needs its client, after the command has imported Prefect, torch and the
stages; the server then takes seconds more to import its own stack and answer (5 s of
imports, then 10 s to the flow's start on 2 CPU cores here). `start_early` runs the very
command Prefect would run, before those imports, so the two overlap; `adopt` (once
Prefect is imported) hands it to Prefect's own singleton, which then finds its server
running. When a configured API turns up (a profile, a `.env`: only Prefect can tell) or
anything does not fit, the early server is stopped and Prefect behaves as without it.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

COMMAND_LINE_SETTINGS = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                         "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
"""What a command-line run sets unless the environment does: no telemetry offline, and
patience for the server's start on a busy machine (a warm worker loading beside it)."""

# As Prefect's SubprocessASGIServer runs it (prefect 3.x, server/api/server.py).
_SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
               "PREFECT__SERVER_FINAL": "1"}
_PORTS = range(8000, 9000)

_early: tuple[subprocess.Popen, int] | None = None


def apply_command_line_settings() -> dict[str, str]:
    """Put `COMMAND_LINE_SETTINGS` the environment lacks into it; returns those."""
    missing = {name: value for name, value in COMMAND_LINE_SETTINGS.items()
               if name not in os.environ}
    os.environ.update(missing)
    return missing


def start_early() -> None:
    """Start the embedded server's process now, unless an API URL is in the environment
    (a profile's is found by `adopt`, which then stops it)."""
    global _early
    if _early is not None or os.environ.get("PREFECT_API_URL"):
        return
    spec = importlib.util.find_spec("prefect")  # found, not imported
    if spec is None or not spec.submodule_search_locations:
        return
    apply_command_line_settings()
    port = _free_port()
    if port is None:
        return
    app_dir = Path(list(spec.submodule_search_locations)[0]).parent
    command = [sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir), "--factory",
               "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port",
               str(port), "--log-level", "error", "--lifespan", "on"]
    try:
        process = subprocess.Popen(command, env={**os.environ, **_SERVER_ENV})
    except OSError:
        return
    _early = (process, port)
    atexit.register(_stop_unadopted)


def adopt() -> bool:
    """Hand the early server to Prefect's embedded-server singleton, once it answers;
    False (the early server stopped) where Prefect would not use an embedded server or
    it did not come up: Prefect then starts its own, as without `start_early`."""
    global _early
    if _early is None:
        return False
    process, port = _early
    _early = None
    try:
        from prefect.server.api.server import SubprocessASGIServer
        from prefect.settings import (
            PREFECT_API_URL,
            PREFECT_SERVER_EPHEMERAL_ENABLED,
            PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        )

        server = SubprocessASGIServer()
        usable = (not PREFECT_API_URL.value() and PREFECT_SERVER_EPHEMERAL_ENABLED.value()
                  and not server.running and _answers(
                      process, port, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()))
        if not usable:
            _stop(process)
            return False
        server.port, server.server_process, server.running = port, process, True
        atexit.register(server.stop)
        return True
    except Exception:  # noqa: BLE001 - Prefect's internals moved: it starts its own
        _stop(process)
        return False


def _answers(process: subprocess.Popen, port: int, timeout_s: float) -> bool:
    import httpx

    deadline = time.monotonic() + timeout_s
    with httpx.Client() as client:
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if client.get(f"http://127.0.0.1:{port}/api/health").status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    return False


def _free_port() -> int | None:
    for _ in range(10):
        port = random.choice(_PORTS)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return None


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _stop_unadopted() -> None:
    if _early is not None:
        _stop(_early[0])
