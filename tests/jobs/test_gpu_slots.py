"""GPU slots: concurrent runs of a node get different GPUs, the next one waits, a killed
holder frees its slot. Processes are forked (no interpreter start-up per holder)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from fastvideo.jobs.gpu_slots import GPUS_ENV, gpu_slots, slot_holders
from fastvideo.jobs.node import WORKER_DIR_ENV

FORK = multiprocessing.get_context("fork")


def _hold(count: int, report: multiprocessing.Queue, release: Path) -> None:
    """Take `count` slots, report the GPUs this process then sees, hold until `release`."""
    with gpu_slots(count, log=lambda _: None, poll_s=0.05):
        report.put((os.getpid(), os.environ["CUDA_VISIBLE_DEVICES"]))
        while not release.exists():
            time.sleep(0.02)


@pytest.fixture
def two_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(GPUS_ENV, "0,1")
    monkeypatch.setenv(WORKER_DIR_ENV, str(tmp_path / "node"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return tmp_path


def _start(count: int, report: multiprocessing.Queue, release: Path):
    proc = FORK.Process(target=_hold, args=(count, report, release), daemon=True)
    proc.start()
    return proc


def test_two_runs_get_different_gpus_and_a_third_waits(two_gpus: Path) -> None:
    report: multiprocessing.Queue = FORK.Queue()
    release = [two_gpus / f"release-{i}" for i in range(3)]
    procs = [_start(1, report, release[i]) for i in range(2)]
    first = dict(report.get(timeout=20) for _ in procs)
    assert sorted(first.values()) == ["0", "1"]
    assert slot_holders() == {first_gpu: pid for pid, first_gpu in first.items()}

    third = _start(1, report, release[2])
    time.sleep(1.0)  # 20 polls: plenty to take a free slot, had there been one
    assert report.empty(), "a third run took a GPU while both were held"
    # Killing a holder (no cleanup runs) frees its GPU, and the waiting run takes it.
    killed_pid, killed_gpu = next((pid, gpu) for pid, gpu in first.items() if gpu == "1")
    os.kill(killed_pid, signal.SIGKILL)
    assert report.get(timeout=20) == (third.pid, killed_gpu)
    for path in release:
        path.touch()
    for proc in [*procs, third]:
        proc.join(timeout=20)
    assert slot_holders() == {"0": None, "1": None}


def test_a_job_takes_all_its_gpus_at_once(two_gpus: Path) -> None:
    report: multiprocessing.Queue = FORK.Queue()
    one = _start(1, report, two_gpus / "release-one")
    assert report.get(timeout=20)[1] == "0"
    both = _start(2, report, two_gpus / "release-both")
    time.sleep(0.5)
    assert report.empty() and slot_holders()["1"] is None  # holds nothing while waiting
    (two_gpus / "release-one").touch()
    assert report.get(timeout=20) == (both.pid, "0,1")
    (two_gpus / "release-both").touch()
    for proc in (one, both):
        proc.join(timeout=20)


def test_slots_need_gpus(two_gpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="asks for 3 GPUs; this node has 2"), gpu_slots(3):
        pass
    monkeypatch.setenv(GPUS_ENV, "")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with gpu_slots(1, log=lambda _: None) as gpus:  # no GPUs: nothing held, nothing set
        assert gpus == [] and os.environ["CUDA_VISIBLE_DEVICES"] == ""
