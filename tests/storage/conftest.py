"""Fixtures for storage tests; `s3_server` (a SeaweedFS S3 on loopback) is shared."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from fastvideo.pipelines.pipeline_batch_info import ForwardBatch
from fastvideo.storage import LocalStore
from tests.s3_server import S3Endpoint, s3_server  # noqa: F401 - re-exported fixture


@pytest.fixture
def local_store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


@pytest.fixture
def s3_env(s3_server: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Endpoint]:  # noqa: F811
    """Point boto3's standard credential chain at the test server."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    yield s3_server


@pytest.fixture
def make_batch() -> Callable[..., ForwardBatch]:
    return build_batch


def build_batch(seed: int = 0) -> ForwardBatch:
    """A small batch with every kind of value a checkpoint must carry."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 3, 8, 12, generator=g)
    latents.view(-1)[:3] = torch.tensor([float("nan"), -0.0, float("inf")])  # must survive as bits
    return ForwardBatch(
        prompt=["a red fox", "a blue bird"],
        negative_prompt=None,
        height=64,
        width=96,
        num_frames=9,
        guidance_scale=4.5,
        seed=seed,
        request_id="req-1",
        prompt_embeds=torch.randn(2, 7, 16, generator=g).to(torch.bfloat16),
        timesteps=torch.arange(1000, 0, -100, dtype=torch.int64),
        latents=latents,
        step_index=3,
        timings={"text_encoding": 0.25},
        extra={
            "scheduler_state": {
                "model_outputs.0": torch.randn(2, 4, generator=g),
                "lower_order_nums": 1,
                "last_sample": None,
            },
            "noise": torch.randn(3, generator=g).to(torch.float16),
            "sigmas": [1.0, 0.5, 0.0],
            "label": "x",
        },
    )
