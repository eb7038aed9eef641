"""This node's folder for what its processes share: warm workers' sockets and logs
(`worker_client`) and GPU slot locks (`gpu_slots`). Imports nothing heavy, so node tools
start fast."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

WORKER_DIR_ENV = "FASTVIDEO_WORKER_DIR"


def worker_dir() -> Path:
    """`$FASTVIDEO_WORKER_DIR`, default `/tmp/fastvideo-workers-<uid>`; on node-local disk,
    and short: a socket path is limited to ~100 bytes."""
    default = Path(tempfile.gettempdir()) / f"fastvideo-workers-{os.getuid()}"
    folder = Path(os.environ.get(WORKER_DIR_ENV) or default)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder
