"""Shared fixtures: tiny Diffusers-format Wan and HunyuanVideo checkpoints, built once per
session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tests.s3_server import S3Endpoint, s3_server  # noqa: F401 - one S3 server per session

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Weight digests the model fingerprint remembers: this session's own, not the user's.
os.environ.setdefault("FASTVIDEO_CACHE_DIR", tempfile.mkdtemp(prefix="fastvideo-cache-"))


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


@pytest.fixture(scope="session")
def tiny_wan_i2v_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Wan2.1 I2V checkpoint (CLIP image encoder, conditioned DiT), UniPC scheduler."""
    from fastvideo.testing.tiny_wan import TinyWanConfig, make_tiny_wan

    return make_tiny_wan(tmp_path_factory.mktemp("tiny-wan-i2v"), TinyWanConfig(kind="i2v"))


@pytest.fixture(scope="session")
def tiny_hunyuan_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny HunyuanVideo T2V checkpoint (Llama + CLIP text encoders, guidance-embedding DiT)."""
    from fastvideo.testing.tiny_hunyuan import make_tiny_hunyuan

    return make_tiny_hunyuan(tmp_path_factory.mktemp("tiny-hunyuan"))


@pytest.fixture
def s3_env(s3_server: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> S3Endpoint:  # noqa: F811
    """boto3's standard chain (here and in subprocesses) points at the session's test S3."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_server
