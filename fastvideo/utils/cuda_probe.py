"""The default device ("cuda" or "cpu") as `torch.cuda.is_available()` would say, without
importing torch where the answer is certain.

Importing torch takes seconds, and a command's first act is to start a warm worker whose
spec names its device: with torch not yet imported, this reads torch's build (its
`version.py`) and asks the CUDA driver through ctypes for its version and device count.
Where that cannot settle it (a ROCm build, a driver older than torch's CUDA, anything
unreadable), it imports torch and asks it, so the answer never differs from torch's.
"""

from __future__ import annotations

import ctypes
import importlib.util
import re
import sys
from pathlib import Path

DRIVER_LIBRARY = "libcuda.so.1"
_ASSIGNMENT = re.compile(r"^(cuda|hip)\b[^=]*=\s*(.+?)\s*$", re.MULTILINE)


def torch_build() -> dict[str, str | None] | None:
    """torch's CUDA and HIP versions from its `version.py` (`{"cuda": "13.0", "hip":
    None}`), None where torch or the file cannot be read."""
    spec = importlib.util.find_spec("torch")  # finds the package; imports nothing
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        text = (Path(list(spec.submodule_search_locations)[0]) / "version.py").read_text()
    except OSError:
        return None
    found: dict[str, str | None] = {}
    for name, value in _ASSIGNMENT.findall(text):
        found[name] = None if value == "None" else value.strip("'\"")
    return found if "cuda" in found else None


def driver_devices(library: str = DRIVER_LIBRARY) -> tuple[int, int] | None:
    """(driver version as CUDA writes it, e.g. 13000; visible devices), or None without a
    working driver. Honours CUDA_VISIBLE_DEVICES, as torch does."""
    try:
        driver = ctypes.CDLL(library)
    except OSError:
        return None
    version, count = ctypes.c_int(), ctypes.c_int()
    if driver.cuInit(0) != 0 or driver.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    if driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return None
    return version.value, count.value


def probe_device(library: str = DRIVER_LIBRARY) -> str | None:
    """"cuda" or "cpu" where torch's build and the driver settle it, else None."""
    build = torch_build()
    if build is None or build.get("hip"):
        return None
    if build["cuda"] is None:
        return "cpu"  # a CPU build of torch sees no GPU whatever the machine has
    devices = driver_devices(library)
    if devices is None or devices[1] == 0:
        return "cpu"
    try:
        needed = int(build["cuda"].split(".")[0]) * 1000
    except ValueError:
        return None
    return "cuda" if devices[0] >= needed else None  # an older driver: torch decides


def default_device(library: str = DRIVER_LIBRARY) -> str:
    """"cuda" when torch would find a CUDA device, else "cpu"."""
    if "torch" not in sys.modules:
        probed = probe_device(library)
        if probed is not None:
            return probed
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
