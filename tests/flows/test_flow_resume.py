"""SIGKILL the bulk flow during denoising, run it again: it resumes, bit-exact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from flows.bulk import bulk
from tests.flows.helpers import (
    PROMPTS,
    REPO,
    TINY,
    checkpoint_latents,
    read_manifest,
    stop_group,
    task_states,
    write_dataset,
)

# Enough steps that the kill lands between two progress checkpoints of the second item.
STEPS = 20
CHECKPOINT_EVERY = 2


def _wait_for_second_item_denoising(s3, bucket: str, prefix: str, proc: subprocess.Popen,
                                    timeout_s: float = 180.0) -> None:
    """Return once item 1 is denoised and item 2 has saved a progress checkpoint."""
    client = s3.client()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the flow ended before it could be killed"
        keys = [o["Key"] for o in client.list_objects_v2(
            Bucket=bucket, Prefix=f"{prefix}/checkpoints/denoise").get("Contents", [])]
        # A progress checkpoint shares its digest with the output it leads to.
        done = {k.split("/")[-2] for k in keys if "/denoise/" in k and k.endswith("manifest.json")}
        in_progress = {k.split("/")[-2] for k in keys
                       if "/denoise-progress/" in k and k.endswith("manifest.json")}
        if len(done) == 1 and in_progress - done:
            return
        time.sleep(0.02)
    raise AssertionError("item 2 never started denoising")


def test_sigkill_during_denoise_then_rerun(s3_env, flow_env, tiny_wan_path: Path,
                                          tmp_path: Path) -> None:
    bucket = s3_env.create_bucket()
    output = f"s3://{bucket}/killed"
    dataset = write_dataset(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS[:2]])
    options = {**TINY, "num_inference_steps": STEPS}
    cli_options = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    model_path = str(tiny_wan_path)
    cmd = [sys.executable, "-m", "flows.bulk", "--dataset", str(dataset), "--output", output,
           "--model-path", model_path, f"--checkpoint-every={CHECKPOINT_EVERY}", *cli_options]
    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env={**flow_env, **s3_env.env()}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for_second_item_denoising(s3_env, bucket, "killed", proc)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            stop_group(proc)
    assert proc.returncode == -signal.SIGKILL

    state = bulk(dataset=str(dataset), output=output, model_path=model_path,
                 checkpoint_every=CHECKPOINT_EVERY, return_state=True, **options)
    assert state.is_completed(), state.message
    rows = read_manifest(output)
    assert [r["status"] for r in rows.values()] == ["succeeded"] * 2
    first, second = rows.values()
    # The killed item continued from a saved step, not from the start.
    assert second["resumed_from_step"] >= CHECKPOINT_EVERY

    # Nothing finished before the kill ran again: Prefect shows it Cached.
    states = task_states(state.state_details.flow_run_id)
    for stage in ("encode-text", "prepare-latents", "denoise", "decode", "write-video"):
        assert states[f"{stage}-shard-00000-{first['item_id']}"] == ["Cached"], states
    for stage in ("encode-text", "prepare-latents"):
        assert states[f"{stage}-shard-00001-{second['item_id']}"] == ["Cached"], states
    assert states[f"denoise-shard-00001-{second['item_id']}"] == ["Completed"], states

    # Final latents equal an uninterrupted run's, bit for bit (CPU fp32).
    reference = f"s3://{bucket}/uninterrupted"
    state = bulk(dataset=str(dataset), output=reference, model_path=model_path,
                 checkpoint_every=CHECKPOINT_EVERY, return_state=True, **options)
    assert state.is_completed(), state.message
    expected = read_manifest(reference)
    for item_id, row in rows.items():
        resumed = checkpoint_latents(row["denoise_checkpoint_uri"])
        uninterrupted = checkpoint_latents(expected[item_id]["denoise_checkpoint_uri"])
        assert torch.equal(resumed, uninterrupted), item_id
        assert row["video_sha256"] == expected[item_id]["video_sha256"]
