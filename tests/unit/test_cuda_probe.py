"""The default device without importing torch (`fastvideo.utils.cuda_probe`): torch's build
read from its `version.py`, the driver asked through ctypes (a stand-in driver library
built here with the C compiler), and torch asked wherever those cannot settle it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastvideo.utils import cuda_probe
from tests.stand_in_driver import build_driver

_DRIVER = r"""
#include <stdlib.h>
static int env(const char *name) { const char *v = getenv(name); return v ? atoi(v) : 0; }
int cuInit(unsigned flags) { return env("PROBE_INIT_ERROR"); }
int cuDriverGetVersion(int *version) { *version = env("PROBE_DRIVER_VERSION"); return 0; }
int cuDeviceGetCount(int *count) { *count = env("PROBE_DEVICES"); return 0; }
"""


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_driver(tmp_path_factory.mktemp("probe-driver"), _DRIVER))


@pytest.fixture
def cuda_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda_probe, "torch_build", lambda: {"cuda": "13.0", "hip": None})


def _driver_says(monkeypatch: pytest.MonkeyPatch, version: int, devices: int,
                 init_error: int = 0) -> None:
    monkeypatch.setenv("PROBE_DRIVER_VERSION", str(version))
    monkeypatch.setenv("PROBE_DEVICES", str(devices))
    monkeypatch.setenv("PROBE_INIT_ERROR", str(init_error))


def test_torch_build_is_read_without_importing_torch() -> None:
    assert cuda_probe.torch_build() == {"cuda": torch.version.cuda, "hip": torch.version.hip}
    code = ("import sys; from fastvideo.utils.cuda_probe import torch_build; "
            "torch_build(); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"


@pytest.mark.usefixtures("cuda_build")
def test_a_cuda_build_with_a_recent_driver_and_a_device_is_cuda(
        driver: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _driver_says(monkeypatch, 13000, 2)
    assert cuda_probe.driver_devices(driver) == (13000, 2)
    assert cuda_probe.probe_device(driver) == "cuda"
    _driver_says(monkeypatch, 13020, 1)
    assert cuda_probe.probe_device(driver) == "cuda"


@pytest.mark.usefixtures("cuda_build")
def test_no_device_or_no_driver_is_cpu(driver: str, monkeypatch: pytest.MonkeyPatch,
                                       tmp_path: Path) -> None:
    _driver_says(monkeypatch, 13000, 0)  # e.g. CUDA_VISIBLE_DEVICES=""
    assert cuda_probe.probe_device(driver) == "cpu"
    _driver_says(monkeypatch, 13000, 2, init_error=100)  # cuInit failed: no usable driver
    assert cuda_probe.driver_devices(driver) is None
    assert cuda_probe.probe_device(driver) == "cpu"
    assert cuda_probe.probe_device(str(tmp_path / "libcuda-missing.so")) == "cpu"


@pytest.mark.usefixtures("cuda_build")
def test_a_driver_older_than_torchs_cuda_is_left_to_torch(
        driver: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _driver_says(monkeypatch, 12080, 1)
    assert cuda_probe.probe_device(driver) is None


def test_cpu_and_rocm_builds(driver: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _driver_says(monkeypatch, 13000, 1)
    monkeypatch.setattr(cuda_probe, "torch_build", lambda: {"cuda": None, "hip": None})
    assert cuda_probe.probe_device(driver) == "cpu"  # a GPU torch cannot use
    monkeypatch.setattr(cuda_probe, "torch_build", lambda: {"cuda": None, "hip": "6.4"})
    assert cuda_probe.probe_device(driver) is None
    monkeypatch.setattr(cuda_probe, "torch_build", lambda: None)  # unreadable
    assert cuda_probe.probe_device(driver) is None


def _default_device_in_a_fresh_process(driver: str, version: int) -> tuple[str, bool]:
    code = ("import sys; from fastvideo.utils import cuda_probe as p; "
            "p.torch_build = lambda: {'cuda': '13.0', 'hip': None}; "
            f"print(p.default_device({driver!r}), 'torch' in sys.modules)")
    env = {**os.environ, "PROBE_DRIVER_VERSION": str(version), "PROBE_DEVICES": "3",
           "PROBE_INIT_ERROR": "0"}
    device, imported = subprocess.run([sys.executable, "-c", code], capture_output=True,
                                      text=True, check=True, env=env).stdout.split()
    return device, imported == "True"


def test_torch_answers_once_imported_or_where_the_probe_cannot(
        driver: str, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    _driver_says(monkeypatch, 13000, 3)
    monkeypatch.setattr(cuda_probe, "torch_build", lambda: {"cuda": "13.0", "hip": None})
    assert cuda_probe.default_device(driver) == expected  # torch imported: torch's answer
    # A command's first act: settled without torch, or torch imported and asked.
    assert _default_device_in_a_fresh_process(driver, 13000) == ("cuda", False)
    assert _default_device_in_a_fresh_process(driver, 12000) == (expected, True)
