"""Fixtures for storage tests (`s3_server` / `s3_env` come from tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fastvideo.forward_batch import ForwardBatch
from fastvideo.storage import LocalStore


@pytest.fixture
def local_store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


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
