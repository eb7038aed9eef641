"""CUDA's start on a thread (`fastvideo.utils.cuda_prewarm`), against a stand-in driver
library built here with the C compiler: the calls, their order and arguments, and how a
failing call or a missing driver is reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastvideo.utils.cuda_prewarm import CudaPrewarm, device_index, prewarm_from_argv
from tests.stand_in_driver import build_driver

_DRIVER = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
static FILE *log_file(void) { return fopen(getenv("PREWARM_LOG"), "a"); }
static int fail(const char *name) {
    const char *f = getenv("PREWARM_FAIL");
    return f && !strcmp(f, name) ? 100 : 0;
}
int cuInit(unsigned flags) {
    FILE *f = log_file(); fprintf(f, "cuInit %u\n", flags); fclose(f); return fail("cuInit");
}
int cuDeviceGet(int *device, int ordinal) {
    FILE *f = log_file(); fprintf(f, "cuDeviceGet %d\n", ordinal); fclose(f);
    *device = 40 + ordinal; return fail("cuDeviceGet");
}
int cuDevicePrimaryCtxRetain(void **context, int device) {
    FILE *f = log_file(); fprintf(f, "cuDevicePrimaryCtxRetain %d\n", device); fclose(f);
    *context = (void *)1; return fail("cuDevicePrimaryCtxRetain");
}
"""


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_driver(tmp_path_factory.mktemp("driver"), _DRIVER)


def test_driver_and_context_started_in_order(driver: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "calls.log"
    monkeypatch.setenv("PREWARM_LOG", str(log))
    monkeypatch.delenv("PREWARM_FAIL", raising=False)
    line = CudaPrewarm(2, library=str(driver)).wait(timeout=10)
    assert log.read_text().splitlines() == ["cuInit 0", "cuDeviceGet 2",
                                            "cuDevicePrimaryCtxRetain 42"]
    assert line.startswith("CUDA's driver and device 2's context started on a thread")


def test_a_failing_call_stops_there_and_is_named(driver: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "calls.log"
    monkeypatch.setenv("PREWARM_LOG", str(log))
    monkeypatch.setenv("PREWARM_FAIL", "cuDeviceGet")
    prewarm = CudaPrewarm(0, library=str(driver))
    assert prewarm.wait(timeout=10) == ("CUDA's start on a thread did not run: cuDeviceGet "
                                        "returned CUDA error 100")
    assert log.read_text().splitlines() == ["cuInit 0", "cuDeviceGet 0"]
    assert prewarm.seconds is None


def test_no_driver_is_reported(tmp_path: Path) -> None:
    line = CudaPrewarm(0, library=str(tmp_path / "libcuda-missing.so")).wait(timeout=10)
    assert line.startswith("CUDA's start on a thread did not run: no CUDA driver:")


def test_device_from_the_worker_command_line() -> None:
    assert device_index("cuda") == 0 and device_index("cuda:3") == 3
    assert device_index("cpu") is None and device_index("cuda:x") is None
    assert prewarm_from_argv(["--spec", json.dumps({"device": "cpu"})]) is None
    assert prewarm_from_argv(["--socket", "s"]) is None  # no spec
    assert prewarm_from_argv(["--spec", "{not json"]) is None
    assert prewarm_from_argv(["--spec", json.dumps({"model_path": "m"})]) is None
