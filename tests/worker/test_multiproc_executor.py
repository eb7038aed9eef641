"""VideoGenerator with several worker processes (CPU processes on gloo here)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from fastvideo import VideoGenerator
from fastvideo.worker.multiproc_executor import WorkerError

REQUEST = dict(prompt="a cat walks across a sunny garden", height=32, width=48, num_frames=5,
               num_inference_steps=3, seed=11)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def single_process_result(tiny_wan_path: Path):
    return VideoGenerator.from_pretrained(tiny_wan_path, device="cpu").generate_video(**REQUEST)


@pytest.mark.parametrize("sp_size", [1, 2])
def test_two_workers_equal_one_process(tiny_wan_path: Path, single_process_result,
                                       sp_size: int) -> None:
    with VideoGenerator.from_pretrained(tiny_wan_path, device="cpu", num_gpus=2,
                                        sp_size=sp_size) as generator:
        pids = generator.executor.pids
        result = generator.generate_video(**REQUEST)
    # sp=2 splits attention across processes: fp32 sums in another order, so 1e-5.
    torch.testing.assert_close(result.latents, single_process_result.latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(result.frames, single_process_result.frames, rtol=0, atol=1e-4)
    time.sleep(0.5)
    assert not any(_alive(p) for p in pids), "workers outlived shutdown()"


def test_dead_worker_fails_the_call_quickly(tiny_wan_path: Path) -> None:
    generator = VideoGenerator.from_pretrained(tiny_wan_path, device="cpu", num_gpus=2)
    pids = generator.executor.pids
    threading.Timer(0.5, os.kill, (pids[1], signal.SIGKILL)).start()
    start = time.monotonic()
    with pytest.raises(WorkerError, match=r"worker 1 \(pid \d+\) died with exit code -9"):
        generator.generate_video(**{**REQUEST, "num_inference_steps": 200, "height": 64,
                                    "width": 64, "num_frames": 9})
    assert time.monotonic() - start < 10
    time.sleep(0.5)
    assert not any(_alive(p) for p in pids), "a worker was left running"


def test_rejected_request_keeps_workers_usable(tiny_wan_path: Path) -> None:
    with VideoGenerator.from_pretrained(tiny_wan_path, device="cpu", num_gpus=2,
                                        sp_size=1) as generator:
        with pytest.raises(WorkerError, match=r"worker 0 failed: ValueError: height=33 must be a multiple of 8"):
            generator.generate_video(**{**REQUEST, "height": 33})
        # Every worker rejected the same request: they stay in step and serve the next one.
        assert generator.generate_video(**REQUEST).frames.shape == (5, 32, 48, 3)


def test_replicas_split_the_prompts(tiny_wan_path: Path) -> None:
    """num_gpus=2 with sp_size=1: two replicas, each making its share of the videos; each
    video is the one a single process makes for the same request."""
    prompts = ["a cat walks across a sunny garden", "waves on a beach at dusk",
               "a red kite over green hills"]
    request = {k: v for k, v in REQUEST.items() if k != "prompt"}
    expected = VideoGenerator.from_pretrained(tiny_wan_path, device="cpu").generate_video(
        prompts, **request)
    with VideoGenerator.from_pretrained(tiny_wan_path, device="cpu", num_gpus=2,
                                        sp_size=1) as generator:
        assert (generator.executor.num_replicas, generator.executor.replica_size) == (2, 1)
        results = generator.generate_video(prompts, **request)
    assert [r.prompt for r in results] == prompts
    for got, want in zip(results, expected):
        torch.testing.assert_close(got.latents, want.latents, rtol=0, atol=1e-5)
        torch.testing.assert_close(got.frames, want.frames, rtol=0, atol=1e-4)
    # Different noise rows: the items are not copies of one another.
    assert not torch.allclose(results[0].latents, results[1].latents)
