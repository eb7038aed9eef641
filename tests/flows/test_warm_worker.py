"""Bulk runs on a warm worker (dispatch `worker`, placement `all`): every stage in one
long-lived process that loads the model once, equal to in-process runs bit for bit, and a
killed worker fails its shard in seconds while the rerun resumes mid-denoise.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch

from fastvideo.jobs import worker_client
from fastvideo.jobs.engine import ENGINE
from fastvideo.jobs.options import EngineOptions
from fastvideo.jobs.worker_client import (
    WorkerSpec,
    describe_worker,
    ensure_worker,
    running_workers,
)
from fastvideo.storage import model_fingerprint
from flows.bulk import bulk
from tests.flows.helpers import (
    PROMPTS,
    TINY,
    checkpoint_latents,
    read_manifest,
    run_log_messages,
    task_states,
    write_dataset,
)

OPTIONS = {**TINY, "num_inference_steps": 12}
CHECKPOINT_EVERY = 2


def _spec(model: Path, **options: Any) -> WorkerSpec:
    """The spec of the worker a flow on this node uses for `model` and `options`."""
    return WorkerSpec(model_path=str(model.resolve()), device="cpu", dtype="float32",
                      options=EngineOptions(**options),
                      model_fingerprint=model_fingerprint(model.resolve()))


def _bulk(dataset: Path, output: Path, model: Path, **options: Any):
    return bulk(dataset=str(dataset), output=str(output), model_path=str(model),
                checkpoint_every=CHECKPOINT_EVERY, negative_prompt="blurry, static",
                return_state=True, **{**OPTIONS, **options})


def test_options_reach_the_worker(worker_dir: Path, tiny_wan_path: Path, monkeypatch) -> None:
    spec = _spec(tiny_wan_path, attention_backend="TORCH_SDPA", batch_cfg=False,
                 enable_torch_compile=True, vae_dtype="bfloat16", step_cache_threshold=0.05)
    monkeypatch.setattr(worker_client, "WAIT_NOTE_S", 0.5)
    notes: list[str] = []
    ensure_worker(spec, on_wait=notes.append)
    # A caller waiting for the load hears of it: its start (with the log), while it lasts
    # (with the log's last line), its end.
    log = next(worker_dir.glob("*.log"))
    assert notes[0] == f"waiting for the warm worker to load {spec.model_path} on cpu " \
                       f"(its log: {log})", notes
    assert re.fullmatch(r"the warm worker is still loading after \d+ s; its log ends: .+",
                        notes[1]), notes
    assert notes[-1].startswith("the warm worker is ready after "), notes
    notes.clear()
    ensure_worker(spec, on_wait=notes.append)
    assert notes == []  # a running worker: nothing to wait for
    info = describe_worker(spec)
    args = info["fastvideo_args"]
    assert (args["attention_backend"], args["batch_cfg"], args["enable_torch_compile"],
            args["vae_dtype"], args["step_cache_threshold"]) == \
        ("TORCH_SDPA", False, True, "bfloat16", 0.05)
    assert info["attention_backends"]["requested"] == ["TORCH_SDPA"]
    assert info["compiled_blocks"] == 2  # the tiny DiT's two blocks, compiled on first use
    assert info["compile_s"]["total"] == 0.0 and "dynamo_tracing" in info["compile_s"]
    assert info["batch_cfg"] is False and info["sta"] is False
    # Its log says what its start-up cost, from its spawn (imports) and its load.
    log = "".join(p.read_text() for p in worker_dir.glob("*.log"))
    assert "s after its spawn at" in log and "loaded in" in log, log[-2000:]
    # ... split into the parts of the load (on CPU: no CUDA part), the weights' reading
    # started first.
    assert re.search(r"reading \d+\.\d\d GB of weights in the background", log), log[-2000:]
    assert re.search(r"load: the pipeline's imports \d+\.\d\d s, the modules \d+\.\d\d s", log), \
        log[-2000:]
    # Our own modules (text encoder, DiT) were built on a thread beside those imports.
    assert re.search(r"read text_encoder, transformer ahead on a thread in \d+\.\d\d s", log), \
        log[-2000:]
    # Other options, another worker; the same options, the same worker.
    other = _spec(tiny_wan_path)
    assert describe_worker(other)["pid"] != info["pid"]
    assert describe_worker(spec)["pid"] == info["pid"]
    # `python -m fastvideo.jobs.worker_client stop` frees the node.
    assert len(running_workers()) == 2
    worker_client.main(["stop"])
    deadline = time.monotonic() + 30
    while running_workers():
        assert time.monotonic() < deadline, running_workers()
        time.sleep(0.2)


def test_windows_share_one_model_load_and_equal_inprocess(
        prefect_server, worker_dir: Path, tiny_wan_path: Path, tmp_path: Path) -> None:
    dataset = write_dataset(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    builds_here = len(ENGINE.builds)
    state = _bulk(dataset, tmp_path / "worker", tiny_wan_path, dispatch="worker",
                  shard_size=1, concurrency=1)
    assert state.is_completed(), state.message
    # The flow's process loaded nothing: every stage ran on the worker.
    assert len(ENGINE.builds) == builds_here
    (pid,) = running_workers()
    info = describe_worker(_spec(tiny_wan_path))
    assert info["pid"] == pid
    # Three shards, three task runs, one load of every module (the stages' own pipelines,
    # built on first use, take the modules already there).
    assert [b["loaded"] for b in info["builds"] if b["loaded"]] == [
        ["scheduler", "text_encoder", "tokenizer", "transformer", "vae"]]
    # Of those, the text encoder and the DiT were built ahead, beside the worker's imports.
    assert [b["preloaded"] for b in info["builds"] if b["loaded"]] == [
        ["text_encoder", "transformer"]]
    names = task_states(state.state_details.flow_run_id)
    assert len([n for n in names if n.startswith("generate-shard-")]) == 3
    # The run's log says when it waited for the worker's load, and for how long.
    logs = run_log_messages(state.state_details.flow_run_id, "warm worker is ready")
    assert any(m.startswith("waiting for the warm worker to load") for m in logs), logs
    assert any(m.startswith("the warm worker is ready after") for m in logs), logs
    # Its log times its first denoise per step, once (the first video's first calls).
    log = "".join(p.read_text() for p in worker_dir.glob("*.log"))
    assert len(re.findall(r"first denoise of this process: \d+ steps in \d+\.\d\d s; "
                          r"steps 1-3 \d+\.\d\d, ", log)) == 1, log[-2000:]

    reference = _bulk(dataset, tmp_path / "inprocess", tiny_wan_path)
    assert reference.is_completed(), reference.message
    worker_rows = read_manifest(str(tmp_path / "worker"))
    inprocess_rows = read_manifest(str(tmp_path / "inprocess"))
    # Shards end in any order on the worker; the manifest keeps the dataset's.
    assert list(worker_rows) == list(inprocess_rows)
    for item_id, row in inprocess_rows.items():
        # Overlapped lanes on the worker, stage tasks here: the same video, bit for bit.
        assert worker_rows[item_id]["video_sha256"] == row["video_sha256"], item_id
        assert torch.equal(checkpoint_latents(worker_rows[item_id]["denoise_checkpoint_uri"]),
                           checkpoint_latents(row["denoise_checkpoint_uri"]))


def test_a_warm_up_before_the_first_item_changes_no_output(
        prefect_server, worker_dir: Path, tiny_wan_path: Path, tmp_path: Path,
        monkeypatch) -> None:
    # (The same start diagnoses its load under cProfile when asked.)
    monkeypatch.setenv("FASTVIDEO_PROFILE_LOAD", str(tmp_path / "load.prof"))
    # The worker a command starts early, told the run's video shape: it runs the model once
    # on a dummy request (the DiT at the first step of each kind) before the first item.
    ensure_worker(_spec(tiny_wan_path), warm_up={**TINY, "num_inference_steps": 12,
                                                 "guidance_end": 0.5})
    deadline = time.monotonic() + 120
    while (warm_up := describe_worker(_spec(tiny_wan_path))["warm_up"]) is None:
        assert time.monotonic() < deadline, "no warm-up within 120 s"
        time.sleep(0.2)
    assert "error" not in warm_up, warm_up
    assert warm_up["shape"] == [5, 32, 32] and warm_up["steps"] == 12, warm_up
    assert warm_up["dit_steps"] == [0, 6], warm_up  # guided, then the conditional alone
    log = "".join(p.read_text() for p in worker_dir.glob("*.log"))
    assert re.search(r"warm-up on a dummy request \(5 frames x 32x32, DiT at steps \[0, 6\] "
                     r"of 12\): \d+\.\d s", log), log[-2000:]
    assert (tmp_path / "load.prof").stat().st_size > 0 and "the load under cProfile" in log

    dataset = write_dataset(tmp_path / "prompts.jsonl", [{"prompt": PROMPTS[1]}])
    state = _bulk(dataset, tmp_path / "worker", tiny_wan_path, dispatch="worker",
                  guidance_end=0.5)
    assert state.is_completed(), state.message
    (pid,) = running_workers(worker_dir)
    assert describe_worker(_spec(tiny_wan_path))["pid"] == pid
    reference = _bulk(dataset, tmp_path / "inprocess", tiny_wan_path, guidance_end=0.5)
    assert reference.is_completed(), reference.message
    (worker_row,) = read_manifest(str(tmp_path / "worker")).values()
    (row,) = read_manifest(str(tmp_path / "inprocess")).values()
    assert worker_row["video_sha256"] == row["video_sha256"]
    assert torch.equal(checkpoint_latents(worker_row["denoise_checkpoint_uri"]),
                       checkpoint_latents(row["denoise_checkpoint_uri"]))


def test_killed_worker_fails_its_shard_fast_and_rerun_resumes(
        prefect_server, worker_dir: Path, tiny_wan_path: Path, tmp_path: Path) -> None:
    dataset = write_dataset(tmp_path / "prompts.jsonl", [{"prompt": PROMPTS[0]}])
    output = tmp_path / "out"
    outcome: dict[str, Any] = {}
    # Enough steps that the kill lands mid-denoise: with 12 the tiny model's progress
    # checkpoints could all be written and dropped between two looks at the folder.
    steps = {"num_inference_steps": 48}

    def run() -> None:
        outcome["state"] = _bulk(dataset, output, tiny_wan_path, dispatch="worker", **steps)
        outcome["ended"] = time.monotonic()

    thread = threading.Thread(target=run)
    thread.start()
    progress = output / "checkpoints" / "denoise-progress"
    deadline = time.monotonic() + 240
    while not list(progress.glob("*/manifest.json")):
        assert time.monotonic() < deadline, "no progress checkpoint appeared"
        assert thread.is_alive(), outcome
        time.sleep(0.01)
    (pid,) = running_workers()
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    thread.join(timeout=120)
    state = outcome["state"]
    assert state.is_failed()
    assert outcome["ended"] - killed < 15, "the shard did not fail within seconds"
    (row,) = read_manifest(str(output)).values()
    assert row["status"] == "failed" and "closed the connection" in row["error"]

    rerun = _bulk(dataset, output, tiny_wan_path, dispatch="worker", **steps)
    assert rerun.is_completed(), rerun.message
    (row,) = read_manifest(str(output)).values()
    assert row["resumed_from_step"] >= CHECKPOINT_EVERY
    assert _bulk(dataset, tmp_path / "reference", tiny_wan_path, **steps).is_completed()
    (expected,) = read_manifest(str(tmp_path / "reference")).values()
    # Resumed from the saved latents and scheduler state: bit-exact.
    assert row["video_sha256"] == expected["video_sha256"]


def test_an_item_failing_on_the_worker_fails_alone(prefect_server, worker_dir: Path,
                                                   tiny_wan_path: Path, tmp_path: Path) -> None:
    # 36 pixels is no whole number of latent patches (8): the worker's input validation
    # refuses that item; the other one is made.
    dataset = write_dataset(tmp_path / "prompts.jsonl", [
        {"prompt": PROMPTS[0], "item_id": "good"},
        {"prompt": PROMPTS[1], "item_id": "bad", "height": 36}])
    state = _bulk(dataset, tmp_path / "out", tiny_wan_path, dispatch="worker", shard_size=2,
                  num_inference_steps=2)
    assert state.is_failed()
    rows = read_manifest(str(tmp_path / "out"))
    assert rows["good"]["status"] == "succeeded"
    assert (rows["bad"]["status"], rows["bad"]["failed_stage"]) == ("failed", "encode-text")
    assert "36" in rows["bad"]["error"]
    names = task_states(state.state_details.flow_run_id)
    assert [s for n, s in names.items() if n.startswith("generate-shard-")] == [["Failed"]]


def test_a_long_lived_worker_remembers_nothing_stale(prefect_server, worker_dir: Path,
                                                     tiny_wan_path: Path, tmp_path: Path) -> None:
    dataset = write_dataset(tmp_path / "prompts.jsonl", [{"prompt": PROMPTS[0]}])
    output = tmp_path / "out"
    first = _bulk(dataset, output, tiny_wan_path, dispatch="worker", num_inference_steps=2)
    assert first.is_completed(), first.message
    (pid,) = running_workers()
    # The output, with the run's shared negative embedding, is deleted between runs: the
    # same worker makes everything again.
    shutil.rmtree(output)
    again = _bulk(dataset, output, tiny_wan_path, dispatch="worker", num_inference_steps=2)
    assert again.is_completed(), again.message
    assert list(running_workers()) == [pid]
    # A model replaced at the same path is another model: a new worker serves it.
    model = tmp_path / "model"
    shutil.copytree(tiny_wan_path, model)
    assert _bulk(dataset, tmp_path / "a", model, dispatch="worker",
                 num_inference_steps=2).is_completed()
    config = model / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace('"flow_shift": 3.0', '"flow_shift": 5.0'))
    assert _bulk(dataset, tmp_path / "b", model, dispatch="worker",
                 num_inference_steps=2).is_completed()
    assert len(running_workers()) == 3
