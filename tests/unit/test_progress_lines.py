"""Progress lines of the denoise worker: whole on a pipe shared by several writers, and
parsed without ever failing the task that reads them."""

from __future__ import annotations

import os
import subprocess
import sys

from fastvideo.entrypoints.denoise_worker import parse_progress

WRITERS = 2
LINES = 2000
# What torchrun does with the replicas' leaders: several processes, one stdout pipe,
# Python unbuffered (as PYTHONUNBUFFERED=1 in CI makes it).
WRITER = f"""
import sys
from fastvideo.entrypoints.denoise_worker import _print_progress
for step in range({LINES}):
    _print_progress("item" + sys.argv[1], step, {LINES})
"""


def test_concurrent_writers_never_interleave_a_line() -> None:
    read, write = os.pipe()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(w)], stdout=write, env=env)
             for w in range(WRITERS)]
    os.close(write)
    with os.fdopen(read) as lines:
        parsed = [parse_progress(line) for line in lines]
    assert [p.wait(timeout=60) for p in procs] == [0] * WRITERS
    assert None not in parsed, "a progress line came out mangled"
    for w in range(WRITERS):
        steps = [step for item, step, _ in parsed if item == f"item{w}"]
        assert steps == list(range(LINES))


def test_parse_progress() -> None:
    assert parse_progress("fastvideo-progress abc123 3 12\n") == ("abc123", 3, 12)
    # Not progress: ordinary log lines, and lines two writers glued together.
    assert parse_progress("2026-11-27 rank 0 INFO denoised 3 item(s)") is None
    assert parse_progress("fastvideo-progress a 1 4fastvideo-progress b 1 4") is None
    assert parse_progress("fastvideo-progress a 1") is None
    assert parse_progress("fastvideo-progress a one 4") is None
