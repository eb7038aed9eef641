"""Concurrent writers of one checkpoint key never make a reader see a corrupt checkpoint."""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fastvideo.forward_batch import ForwardBatch
from fastvideo.storage import (
    CorruptCheckpointError,
    LocalStore,
    read_checkpoint,
    retry_io,
    write_checkpoint,
)

KEY = "checkpoints/denoise/same-key"


def _write_loop(root: str, make_batch: Callable[..., ForwardBatch], seconds: float) -> None:
    store = LocalStore(root)
    batch = make_batch(seed=7)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        write_checkpoint(store, KEY, batch)


def test_two_writers_and_a_reader(tmp_path: Path, make_batch: Callable[..., ForwardBatch]) -> None:
    store = LocalStore(tmp_path / "store")
    expected = make_batch(seed=7)
    ref = write_checkpoint(store, KEY, expected)
    # fork: children inherit the imported modules (fast start); nothing here touches CUDA.
    ctx = mp.get_context("fork")
    writers = [
        ctx.Process(target=_write_loop, args=(str(store.root), make_batch, 3.0)) for _ in range(2)
    ]
    for w in writers:
        w.start()
    num_reads = 0
    try:
        while any(w.is_alive() for w in writers):
            try:
                # A reader that loses many races in a row gets StoreUnavailableError: retry it.
                back = retry_io(lambda: read_checkpoint(store, ref), attempts=5, backoff=0.0)
            except CorruptCheckpointError as exc:  # the failure this test exists to catch
                raise AssertionError(f"corrupt read after {num_reads} good ones: {exc}") from exc
            # The reference's digest already pins the content; spot-check it anyway.
            assert isinstance(back.latents, torch.Tensor) and back.prompt == expected.prompt
            num_reads += 1
    finally:
        for w in writers:
            w.join(timeout=30)
    assert [w.exitcode for w in writers] == [0, 0]
    assert num_reads > 20, f"only {num_reads} reads overlapped the writers"
    read_checkpoint(store, ref)
