"""Helpers of the orchestration tests: a Prefect server process, datasets, run inspection."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any
from uuid import UUID

from tests.s3_server import free_ports

REPO = Path(__file__).resolve().parents[2]
# Small enough for seconds per item on a CPU; 32 = 8 x (VAE factor 4 x patch 2).
TINY = dict(height=32, width=32, num_frames=5, num_inference_steps=4, guidance_scale=5.0)
PROMPTS = ["a cat walks across a sunny garden", "a red car drives along the coast at dusk",
           "waves crash on the rocks under a grey sky"]


class PrefectServer:
    """`prefect server start` on a free port, with its own PREFECT_HOME (SQLite)."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = free_ports(1)[0]
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.proc: subprocess.Popen[bytes] | None = None

    def settings_env(self) -> dict[str, str]:
        return {"PREFECT_API_URL": self.api_url, "PREFECT_HOME": str(self.home),
                "PREFECT_LOCAL_STORAGE_PATH": str(self.home / "storage"),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_LOGGING_LEVEL": "INFO"}

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 90.0) -> None:
        # The UI is served too (tests/flows/test_run_record.py drives it in a browser); on a
        # port other than 4200 it must be told where the API is.
        env = {**os.environ, **self.settings_env(), "PREFECT_UI_API_URL": self.api_url}
        env.pop("PREFECT_API_URL")
        log = open(self.home / "server.log", "wb")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
             "--port", str(self.port)], env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("prefect server did not start:\n"
                                   + (self.home / "server.log").read_text()[-3000:])
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)


def stop_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM the process group `proc` leads, SIGKILL it after `grace_s`."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def write_dataset(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def task_states(flow_run_id: UUID | str) -> dict[str, list[str]]:
    """Task run name -> state names (a name repeats when a stage ran twice in the run)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[UUID(str(flow_run_id))])))
    states: dict[str, list[str]] = {}
    for run in sorted(runs, key=lambda r: r.expected_start_time):
        states.setdefault(run.name, []).append(run.state.name)
    return states


def run_log_messages(flow_run_id: UUID | str, wanted: str = "",
                     timeout_s: float = 10.0) -> list[str]:
    """The messages of a flow run's logs (its tasks' included), in order; logs reach the
    API in batches, so this waits up to `timeout_s` for one containing `wanted`."""
    import time

    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + timeout_s
    while True:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(LogFilter(
                flow_run_id=LogFilterFlowRunId(any_=[UUID(str(flow_run_id))])))
        messages = [log.message for log in sorted(logs, key=lambda log: log.timestamp)]
        if any(wanted in m for m in messages) or time.monotonic() > deadline:
            return messages
        time.sleep(0.5)


def read_manifest(output_uri: str) -> dict[str, dict[str, Any]]:
    from fastvideo.storage import open_store
    from tasks.manifest import read_manifest as read_rows

    return {row["item_id"]: row for row in read_rows(open_store(output_uri))}


def checkpoint_latents(uri: str) -> Any:
    """The latents of the checkpoint at a full URI (as written in the manifest)."""
    from fastvideo.storage import open_store, read_checkpoint

    root, key = uri.split("/checkpoints/", 1)
    return read_checkpoint(open_store(root), f"checkpoints/{key}").latents

