"""A stand-in CUDA driver library for tests: C source compiled here into a shared object,
so code that calls the driver through ctypes runs against known answers on any machine."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def build_driver(folder: Path, source: str) -> Path:
    """`source` (C) compiled into `folder/libfakecuda.so`; fails the test without a compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.fail("a C compiler (cc or gcc) is needed to build the stand-in CUDA driver")
    source_file, library = folder / "driver.c", folder / "libfakecuda.so"
    source_file.write_text(source)
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(source_file)],
                   check=True)
    return library
