"""Fixtures for the single-process tests of fastvideo.distributed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch.distributed as dist

from fastvideo.distributed import (
    destroy_distributed_environment,
    maybe_init_distributed_environment_and_model_parallel,
    model_parallel_is_initialized,
)


@pytest.fixture
def uninitialised() -> Iterator[None]:
    """Assert that no process group is set up, as in a plain single-process run."""
    assert not model_parallel_is_initialized() and not dist.is_initialized()
    yield


@pytest.fixture
def world_of_one(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A world of this one process with tp = sp = 1, as outside torchrun; torn down after."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    maybe_init_distributed_environment_and_model_parallel(1, 1)
    try:
        yield
    finally:
        destroy_distributed_environment()
