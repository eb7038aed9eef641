"""Shared fixtures: tiny Diffusers-format Wan checkpoints, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _tiny(tmp_path_factory: pytest.TempPathFactory, scheduler: str) -> Path:
    from fastvideo.testing.tiny_wan import TinyWanConfig, make_tiny_wan

    return make_tiny_wan(tmp_path_factory.mktemp(f"tiny-wan-{scheduler}"),
                         TinyWanConfig(scheduler=scheduler))


@pytest.fixture(scope="session")
def tiny_wan_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Wan2.1 T2V checkpoint with the UniPC scheduler (as the real ones ship)."""
    return _tiny(tmp_path_factory, "unipc")


@pytest.fixture(scope="session")
def tiny_wan_euler_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny checkpoint with a flow-match Euler scheduler."""
    return _tiny(tmp_path_factory, "euler")
