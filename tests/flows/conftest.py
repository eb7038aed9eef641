"""Fixtures for the orchestration tests: a real Prefect server and SeaweedFS S3 on loopback.

Flows run in this process (against the server) or, where a test must kill or deploy
them, in subprocesses that get the same settings through `flow_env`. Both share one
PREFECT_HOME, hence one result storage: a task cached by one process is `Cached` for
the other.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.flows.helpers import REPO, PrefectServer


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A real Prefect API for the session; this process's settings point at it."""
    from prefect.logging.handlers import APILogHandler
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_HOME,
        PREFECT_LOCAL_STORAGE_PATH,
        PREFECT_LOGGING_TO_API_ENABLED,
        temporary_settings,
    )

    server = PrefectServer(tmp_path_factory.mktemp("prefect-home"))
    server.start()
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url, PREFECT_HOME: server.home,
                                 PREFECT_LOCAL_STORAGE_PATH: server.home / "storage",
                                 PREFECT_LOGGING_TO_API_ENABLED: True}):
            yield server
            APILogHandler().flush()  # before the server goes away
    finally:
        server.stop()


@pytest.fixture
def flow_env(prefect_server: PrefectServer) -> dict[str, str]:
    """Environment for a flow or worker subprocess: this session's Prefect and S3."""
    return {**os.environ, **prefect_server.settings_env(), "PYTHONPATH": str(REPO)}


@pytest.fixture
def worker_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh folder for this test's warm workers (short: it holds Unix sockets); every
    worker still running at the end is killed."""
    from fastvideo.jobs.worker_client import WORKER_DIR_ENV, running_workers

    folder = Path(tempfile.mkdtemp(prefix="fvw-"))
    monkeypatch.setenv(WORKER_DIR_ENV, str(folder))
    try:
        yield folder
    finally:
        for pid in running_workers(folder):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(folder, ignore_errors=True)
