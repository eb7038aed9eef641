"""CUDA's start (the driver, the device's primary context) on a thread, beside imports.

A fresh warm worker imports torch and the engine (seconds of Python) and then starts CUDA
(seconds more on a large GPU), one after the other. The driver API called through ctypes
leaves the GIL, so started first, on a thread, CUDA's start runs beside the imports; torch
later finds the driver initialised and the primary context (the one its runtime uses)
made. Nothing here imports torch. Without a driver it does nothing and says why.
"""

from __future__ import annotations

import ctypes
import json
import threading
import time

from fastvideo.utils.cuda_probe import DRIVER_LIBRARY


class CudaPrewarm:
    """Starts at construction; `wait()` joins and says what happened."""

    def __init__(self, device_index: int = 0, library: str = DRIVER_LIBRARY) -> None:
        self.device_index = device_index
        self.library = library
        self.seconds: float | None = None
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="cuda-prewarm", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        start = time.perf_counter()
        try:
            driver = ctypes.CDLL(self.library)
        except OSError as e:
            self.error = f"no CUDA driver: {e}"
            return
        device, context = ctypes.c_int(), ctypes.c_void_p()
        for name, args in (("cuInit", (0,)),
                           ("cuDeviceGet", (ctypes.byref(device), self.device_index)),
                           ("cuDevicePrimaryCtxRetain", (ctypes.byref(context), device))):
            code = getattr(driver, name)(*args)
            if code != 0:
                self.error = f"{name} returned CUDA error {code}"
                return
        self.seconds = time.perf_counter() - start

    def wait(self, timeout: float | None = None) -> str:
        """One line for the log: how long CUDA's start took on the thread, or why not."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            return f"CUDA's start on a thread still running after {timeout} s"
        if self.error is not None:
            return f"CUDA's start on a thread did not run: {self.error}"
        return f"CUDA's driver and device {self.device_index}'s context started on a thread " \
               f"beside the imports in {self.seconds:.2f} s"


def device_index(device: str) -> int | None:
    """The CUDA device ordinal of `device` ("cuda", "cuda:1"), None for any other device."""
    if device == "cuda":
        return 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    return None


def prewarm_from_argv(argv: list[str]) -> CudaPrewarm | None:
    """A warm worker's first act: the device from its `--spec` JSON; None where the spec
    is missing, unreadable or not on CUDA (the worker then reports it as usual)."""
    try:
        spec = json.loads(argv[argv.index("--spec") + 1])
        index = device_index(str(spec["device"]))
    except (ValueError, IndexError, KeyError, TypeError):
        return None
    return None if index is None else CudaPrewarm(index)
