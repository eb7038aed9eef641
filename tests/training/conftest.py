"""One torch thread for these tests: their ops are tiny, a second thread only spins, and
on a shared machine that slows every test here several-fold."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
