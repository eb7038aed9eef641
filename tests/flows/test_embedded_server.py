"""A command starts Prefect's embedded server as its first act (`flows.embedded_server`):
Prefect then runs the flow on that very server, a configured API stops it, and it never
outlives the command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows import embedded_server
from tests.flows.helpers import REPO

_SCRIPT = """
import json, sys
from flows import embedded_server

# A configured API (as a profile gives it, which only Prefect reads): the early server stops.
embedded_server.start_early()
configured_process, _ = embedded_server._early
from prefect.settings import PREFECT_API_URL, temporary_settings
with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
    adopted_configured = embedded_server.adopt()
configured_stopped = configured_process.poll() is not None

# None configured: the early server is the one Prefect runs the flow on.
embedded_server.start_early()
process, port = embedded_server._early
from prefect import flow
from prefect.server.api.server import SubprocessASGIServer
from flows.cli import prepared_environment

@flow
def answer() -> int:
    return 42

with prepared_environment():
    server = SubprocessASGIServer()
    used = server.server_process is process and server.port == port and server.running
    result = answer()
print(json.dumps({"adopted_configured": adopted_configured,
                  "configured_stopped": configured_stopped, "used": used, "result": result,
                  "pid": process.pid}))
"""


def test_the_early_server_runs_the_flow_and_ends_with_the_command(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["adopted_configured"] is False and got["configured_stopped"] is True
    assert got["used"] is True and got["result"] == 42
    assert (tmp_path / "prefect" / "prefect.db").is_file()  # the run's records, as before
    assert not Path(f"/proc/{got['pid']}").exists()  # stopped at the command's exit


def test_no_early_server_with_an_api_in_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    monkeypatch.setattr(embedded_server, "_early", None)
    embedded_server.start_early()
    assert embedded_server._early is None
    assert embedded_server.adopt() is False
