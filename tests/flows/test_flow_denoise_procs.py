"""Denoising dispatched to 2 torchrun processes (gloo, sequence parallel) from the bulk flow.

Equals in-process denoising; a rank killed mid-denoise fails the task without a hang,
and a rerun resumes from the last saved step to the same latents.
"""

from __future__ import annotations

import argparse
import contextvars
import json
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from flows.bulk import bulk
from flows.cli import add_options, given_options
from tasks.dispatch import Dispatch
from tests.flows.helpers import (
    PROMPTS,
    TINY,
    checkpoint_latents,
    read_manifest,
    task_states,
    write_dataset,
)

PROCS = 2
# Enough steps that the kill lands mid-denoise, after a progress checkpoint.
OPTIONS = {**TINY, "num_inference_steps": 12}
CHECKPOINT_EVERY = 2
# sp=2 runs the DiT's linear layers on half the tokens per process and attention on half
# the heads: the same sums, but kernels may block them differently for those shapes, so
# fp32 latents may differ in their last bits. Measured here (torch 2.13 CPU, gloo): 0.0,
# bit-identical; 1e-5 is what the DiT's own sp=2 test allows for one forward.
TOL = 1e-5


def _bulk(dataset: Path, output: str, model_path: Path, **options: Any) -> dict[str, Any]:
    options = {"shard_size": 2, **options}
    state = bulk(dataset=str(dataset), output=output, model_path=str(model_path),
                 checkpoint_every=CHECKPOINT_EVERY, return_state=True, **OPTIONS, **options)
    if not state.is_completed():
        errors = {item: row["error"] for item, row in read_manifest(output).items()}
        raise AssertionError(f"{state.message}: {errors}")
    return read_manifest(output)


def _latents(rows: dict[str, dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {item_id: checkpoint_latents(row["denoise_checkpoint_uri"])
            for item_id, row in rows.items()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("procs-dataset")
    return write_dataset(folder / "prompts.jsonl", [{"prompt": p} for p in PROMPTS[:2]])


@pytest.fixture(scope="module")
def inprocess_latents(prefect_server, dataset: Path, tiny_wan_path: Path,
                      tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    output = str(tmp_path_factory.mktemp("procs-inprocess"))
    return _latents(_bulk(dataset, output, tiny_wan_path))


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    diff = (actual - expected).abs().max().item()
    assert diff <= TOL, f"max abs diff {diff:.3e} > {TOL:.0e}"


@pytest.fixture(scope="module")
def torchrun_latents(prefect_server, dataset: Path, tiny_wan_path: Path,
                     tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    output = str(tmp_path_factory.mktemp("procs-torchrun"))
    rows = _bulk(dataset, output, tiny_wan_path, dispatch="torchrun",
                 nproc_per_node=PROCS)
    assert [r["resumed_from_step"] for r in rows.values()] == [0, 0]
    return _latents(rows)


def test_two_processes_equal_inprocess(inprocess_latents: dict[str, torch.Tensor],
                                       torchrun_latents: dict[str, torch.Tensor]) -> None:
    assert torchrun_latents.keys() == inprocess_latents.keys()
    for item_id, latents in torchrun_latents.items():
        assert_close(latents, inprocess_latents[item_id])


def test_two_replicas_split_the_items_and_equal_inprocess(
        prefect_server, tiny_wan_path: Path, tmp_path: Path) -> None:
    """`sp_size=1` on 2 processes: 2 model replicas share one job of 3 items
    (items 0 and 2 on replica 0, item 1 on replica 1), as in-process denoising makes them."""
    three = write_dataset(tmp_path / "three.jsonl", [{"prompt": p} for p in PROMPTS[:3]])
    expected = _latents(_bulk(three, str(tmp_path / "inprocess"), tiny_wan_path,
                              shard_size=3))
    output = tmp_path / "replicas"
    rows = _bulk(three, str(output), tiny_wan_path, shard_size=3, dispatch="torchrun",
                 nproc_per_node=PROCS, sp_size=1)
    assert {r["status"] for r in rows.values()} == {"succeeded"}
    latents = _latents(rows)
    assert latents.keys() == expected.keys() and len(latents) == 3
    for item_id, value in latents.items():
        assert_close(value, expected[item_id])
    results = list(output.glob("jobs/denoise/*/result.json"))
    assert len(results) == 1
    outcomes = json.loads(results[0].read_text())
    assert [o["info"]["replica"] for o in outcomes] == [0, 1, 0]


def _ranks(store: Path) -> dict[int, psutil.Process]:
    """The denoise worker ranks (children of this process's torchrun) working on `store`."""
    ranks = {}
    for child in psutil.Process().children(recursive=True):
        try:
            if str(store) in " ".join(child.cmdline()) and "RANK" in child.environ():
                ranks[int(child.environ()["RANK"])] = child
        except psutil.NoSuchProcess:
            continue
    return ranks


def _wait_for_progress(store: Path, run: Future, timeout_s: float = 60.0) -> None:
    """Return once the first item has saved a progress checkpoint."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert not run.done(), "the flow ended before a rank could be killed"
        if any((store / "checkpoints" / "denoise-progress").glob("*/manifest.json")):
            return
        time.sleep(0.01)
    raise AssertionError("denoising never saved progress")


def test_killed_rank_fails_the_task_then_a_rerun_resumes(
        prefect_server, dataset: Path, tiny_wan_path: Path,
        torchrun_latents: dict[str, torch.Tensor], tmp_path: Path) -> None:
    output = tmp_path / "killed"
    options = dict(dataset=str(dataset), output=str(output), model_path=str(tiny_wan_path),
                   checkpoint_every=CHECKPOINT_EVERY, shard_size=2, dispatch="torchrun",
                   nproc_per_node=PROCS, **OPTIONS)
    with ThreadPoolExecutor(1) as pool:
        # In this thread's context, so the flow talks to the session's Prefect server.
        run = pool.submit(contextvars.copy_context().run, bulk, **options, return_state=True)
        _wait_for_progress(output, run)
        ranks = _ranks(output)
        assert sorted(ranks) == [0, 1], ranks
        ranks[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        # torchrun stops rank 0, the denoise task fails, the flow ends Failed: no hang.
        state = run.result(timeout=60)
    seconds_to_fail = time.monotonic() - killed_at
    assert state.is_failed(), state.message
    assert seconds_to_fail < 30, f"the flow took {seconds_to_fail:.1f} s to end"
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                   for p in ranks.values()), "a rank outlived the job"
    rows = read_manifest(str(output))
    assert {(r["status"], r["failed_stage"]) for r in rows.values()} == {("failed", "denoise")}
    assert all("torchrun denoise worker exited with" in r["error"] for r in rows.values())

    state = bulk(**options, return_state=True)
    assert state.is_completed(), state.message
    rows = read_manifest(str(output))
    # The item killed mid-denoise went on from a saved step, not from the start.
    assert max(r["resumed_from_step"] for r in rows.values()) >= CHECKPOINT_EVERY
    states = task_states(state.state_details.flow_run_id)
    assert [s for name, s in states.items() if name.startswith("denoise-")] == [["Completed"]]
    # Resumed with the saved scheduler state on the same 2 processes: bit-exact.
    for item_id, latents in _latents(rows).items():
        assert torch.equal(latents, torchrun_latents[item_id]), item_id


def test_several_processes_need_torchrun() -> None:
    with pytest.raises(ValueError, match="nproc_per_node=2 needs torchrun"):
        Dispatch(mode="inprocess", nproc_per_node=2)
    with pytest.raises(ValueError, match="--remote-launcher torchrun"):
        Dispatch(mode="deployment", placement="denoise", nproc_per_node=2)
    Dispatch(mode="deployment", placement="denoise", nproc_per_node=2, remote_launcher="torchrun")
    # Warm workers: one replica per GPU, no sequence parallel across them.
    with pytest.raises(ValueError, match="a warm worker runs one process per GPU"):
        Dispatch(mode="deployment", nproc_per_node=2)
    assert Dispatch(mode="worker", nproc_per_node=2, sp_size=1).uses_worker
    with pytest.raises(ValueError, match=r"sp size 3 must divide the 4 denoise processes; "
                                         r"sizes that work: \[1, 2, 4\]"):
        Dispatch(mode="torchrun", nproc_per_node=4, sp_size=3)
    assert Dispatch(mode="torchrun", nproc_per_node=4, sp_size=2).sp_size == 2

    parser = argparse.ArgumentParser()
    add_options(parser)
    for flag in ("--denoise-procs", "--nproc-per-node"):
        assert given_options(parser.parse_args([flag, "4"]))["nproc_per_node"] == 4
    assert given_options(parser.parse_args(["--sp-size", "2"]))["sp_size"] == 2
