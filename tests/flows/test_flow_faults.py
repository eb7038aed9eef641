"""Faults the bulk flow recovers from: a failing decode, a flipped checkpoint byte, S3 refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import flows.pipeline
from fastvideo.pipelines.stages.decoding import DecodingStage
from flows.bulk import bulk
from tasks.stages import phase_task
from tests.flows.fault_proxy import FaultProxy
from tests.flows.helpers import (
    PROMPTS,
    TINY,
    checkpoint_latents,
    read_manifest,
    task_states,
    write_dataset,
)


def test_decode_failure_then_corrupt_checkpoint_recovers(
        prefect_server, tiny_wan_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = write_dataset(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS[:2]])
    output = tmp_path / "out"
    run = dict(dataset=str(dataset), output=str(output), model_path=str(tiny_wan_path), **TINY)

    # Decoding of the second prompt fails once (an engine fault, e.g. a GPU hiccup).
    real_forward = DecodingStage.forward
    failures = []

    def flaky_forward(self, batch, fastvideo_args):
        if batch.prompt == [PROMPTS[1]] and not failures:
            failures.append(batch.prompt)
            raise RuntimeError("injected decode failure")
        return real_forward(self, batch, fastvideo_args)

    monkeypatch.setattr(DecodingStage, "forward", flaky_forward)
    state = bulk(**run, return_state=True)
    assert state.is_failed()
    rows = read_manifest(str(output))
    good, bad = rows.values()
    assert good["status"] == "succeeded"
    assert (bad["status"], bad["failed_stage"]) == ("failed", "decode")
    assert "injected decode failure" in bad["error"]

    # Flip one byte of the failed item's denoised latents on disk.
    denoised = Path(bad["denoise_checkpoint_uri"].removeprefix("file://"))
    latents_before = checkpoint_latents(bad["denoise_checkpoint_uri"])
    tensors = next(denoised.glob("tensors-*.safetensors"))
    data = bytearray(tensors.read_bytes())
    data[-3] ^= 0x01
    tensors.write_bytes(bytes(data))

    state = bulk(**run, return_state=True)
    assert state.is_completed(), state.message
    rows = read_manifest(str(output))
    assert [r["status"] for r in rows.values()] == ["succeeded"] * 2
    states = task_states(state.state_details.flow_run_id)
    shard_of_bad = f"shard-00000-{bad['item_id']}"
    # The succeeded item is carried over from the manifest: no task runs at all.
    assert not [name for name in states if good["item_id"] in name]
    # The failed one's finished stages are Cached; decode caught the corrupt checkpoint,
    # denoise recomputed it (cache refreshed), and decode ran again.
    assert states[f"encode-text-{shard_of_bad}"] == ["Cached"]
    assert states[f"prepare-latents-{shard_of_bad}"] == ["Cached"]
    assert states[f"denoise-{shard_of_bad}"] == ["Cached", "Completed"]
    assert states[f"decode-{shard_of_bad}"] == ["Failed", "Completed"]
    latents_after = checkpoint_latents(rows[bad["item_id"]]["denoise_checkpoint_uri"])
    assert torch.equal(latents_after, latents_before)


def test_s3_refuses_checkpoint_writes_then_recovers(
        prefect_server, s3_env, tiny_wan_path: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = s3_env.create_bucket()
    dataset = write_dataset(tmp_path / "prompts.jsonl", [{"prompt": PROMPTS[0]}])
    output = f"s3://{bucket}/refused"
    with FaultProxy(s3_env.endpoint_url) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
        # Three refusals in a row exhaust botocore's own attempts on the write of the
        # denoised latents; the store layer then retries it after a backoff.
        rule = proxy.refuse("PUT", "/checkpoints/denoise/", times=3)
        state = bulk(dataset=str(dataset), output=output, model_path=str(tiny_wan_path),
                     return_state=True, **TINY)
        (row,) = read_manifest(output).values()
    assert state.is_completed(), state.message
    assert rule.refused == 3
    assert row["status"] == "succeeded"
    assert row["video_uri"].startswith(f"s3://{bucket}/refused/videos/")


def test_s3_unreachable_mid_run_fails_the_item_cleanly_then_a_rerun_resumes(
        prefect_server, s3_env, tiny_wan_path: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = s3_env.create_bucket()
    s3_env.client().put_object(Bucket=bucket, Key="data/prompts.jsonl",
                               Body=write_dataset(tmp_path / "p.jsonl", [{"prompt": PROMPTS[2]}])
                               .read_bytes())
    run = dict(dataset=f"s3://{bucket}/data/prompts.jsonl", output=f"s3://{bucket}/down",
               model_path=str(tiny_wan_path), **TINY)
    # One Prefect retry without delay keeps the test short; the production default is 3.
    quick = phase_task("decode").with_options(retries=1, retry_delay_seconds=0)
    monkeypatch.setattr(flows.pipeline, "phase_task",
                        lambda name: quick if name == "decode" else phase_task(name))
    with FaultProxy(s3_env.endpoint_url) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
        rule = proxy.refuse("PUT", "/checkpoints/decode/", times=10**6)
        state = bulk(**run, return_state=True)
        (row,) = read_manifest(run["output"]).values()
        assert state.is_failed()
        # botocore's attempts x retry_io's attempts x the task's two runs: all refused.
        assert rule.refused == 3 * 3 * 2
        assert (row["status"], row["failed_stage"]) == ("failed", "decode")
        assert "SlowDown" in row["error"] and s3_env.secret_key not in row["error"]

        rule.times = 0  # the store is back
        state = bulk(**run, return_state=True)
        (row,) = read_manifest(run["output"]).values()
    assert state.is_completed(), state.message
    assert row["status"] == "succeeded"
    states = task_states(state.state_details.flow_run_id)
    assert {name.split("-shard")[0]: s for name, s in states.items() if "-shard" in name} == {
        "encode-text": ["Cached"], "prepare-latents": ["Cached"], "denoise": ["Cached"],
        "decode": ["Completed"], "write-video": ["Completed"]}


@pytest.mark.parametrize("fault", ["missing bucket", "wrong secret"])
def test_bad_s3_configuration_fails_clearly_and_writes_nothing(
        prefect_server, s3_env, tiny_wan_path: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, fault: str) -> None:
    bucket = s3_env.create_bucket()
    dataset = write_dataset(tmp_path / "prompts.jsonl", [{"prompt": PROMPTS[0]}])
    if fault == "missing bucket":
        output, expected = f"s3://{bucket}-missing/run", f"bucket '{bucket}-missing' does not exist"
    else:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        output, expected = f"s3://{bucket}/run", f"access denied to bucket '{bucket}'"
    state = bulk(dataset=str(dataset), output=output, model_path=str(tiny_wan_path),
                 return_state=True, **TINY)
    assert state.is_failed()
    error = str(state.result(raise_on_failure=False))
    assert expected in error and "not-the-secret" not in error and s3_env.secret_key not in error
    assert s3_env.client().list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


def test_an_output_deleted_between_runs_is_made_again_from_the_start(
        prefect_server, tiny_wan_path: Path, tmp_path: Path) -> None:
    """Every stage of the first run is in Prefect's cache, pointing at checkpoints that are
    gone: each missing input sends the flow one phase further up, to the text encoding."""
    import shutil

    dataset = write_dataset(tmp_path / "prompts.jsonl", [{"prompt": PROMPTS[0]}])
    output = tmp_path / "out"
    run = dict(dataset=str(dataset), output=str(output), model_path=str(tiny_wan_path), **TINY)
    assert bulk(**run, return_state=True).is_completed()
    (first,) = read_manifest(str(output)).values()
    shutil.rmtree(output)

    state = bulk(**run, return_state=True)
    assert state.is_completed(), state.message
    (again,) = read_manifest(str(output)).values()
    assert again["status"] == "succeeded"
    assert again["video_sha256"] == first["video_sha256"]
    assert Path(again["video_uri"].removeprefix("file://")).is_file()
    states = task_states(state.state_details.flow_run_id)
    shard = f"shard-00000-{first['item_id']}"
    # Cached at first, then each stage redone once its own input was made again.
    for stage in ("encode-text", "prepare-latents", "denoise", "decode"):
        assert states[f"{stage}-{shard}"][0] == "Cached", states
        assert states[f"{stage}-{shard}"][-1] == "Completed", states
    assert states[f"write-video-{shard}"][-1] == "Completed"
