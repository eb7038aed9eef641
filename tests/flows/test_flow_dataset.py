"""Bad datasets and rows, grown datasets, and the training parquet, through the bulk flow."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.parquet as pq

from flows.bulk import bulk
from tests.flows.helpers import PROMPTS, TINY, read_manifest, task_states, write_dataset


def test_dataset_without_prompt_column_is_refused(prefect_server, tiny_wan_path: Path,
                                                  tmp_path: Path) -> None:
    dataset = tmp_path / "captions.csv"
    dataset.write_text("caption,seed\na cat,1\n")
    state = bulk(dataset=str(dataset), output=str(tmp_path / "out"),
                 model_path=str(tiny_wan_path), return_state=True, **TINY)
    assert state.is_failed()
    error = str(state.result(raise_on_failure=False))
    assert "no 'prompt' column" in error and "caption" in error
    assert not (tmp_path / "out" / "manifest.parquet").exists()


def test_bad_rows_fail_alone_and_a_grown_dataset_makes_only_new_rows(
        prefect_server, tiny_wan_path: Path, tmp_path: Path) -> None:
    rows = [
        {"prompt": PROMPTS[0], "item_id": "good"},
        {"prompt": "", "item_id": "empty-prompt"},
        {"prompt": PROMPTS[1], "item_id": "bad-height", "height": 30},
        {"prompt": PROMPTS[1], "item_id": "bad-steps", "num_inference_steps": "many"},
        {"prompt": PROMPTS[2], "item_id": "good"},
    ]
    dataset = write_dataset(tmp_path / "prompts.jsonl", rows)
    output = tmp_path / "out"
    run = dict(dataset=str(dataset), output=str(output), model_path=str(tiny_wan_path),
               training_data=True, **TINY)
    state = bulk(**run, return_state=True)
    assert state.is_failed()
    manifest = read_manifest(str(output))
    assert manifest["good"]["status"] == "succeeded"
    errors = {item_id: (row["failed_stage"], row["error"]) for item_id, row in manifest.items()
              if row["status"] == "failed"}
    assert errors["empty-prompt"][0] == "dataset" and "prompt" in errors["empty-prompt"][1]
    assert errors["bad-height"][0] == "encode-text" and "height=30" in errors["bad-height"][1]
    assert errors["bad-steps"][0] == "dataset" and "num_inference_steps" in errors["bad-steps"][1]
    duplicate = next(v for k, v in errors.items() if k.startswith("good#"))
    assert "duplicate item_id 'good'" in duplicate[1]

    training = pq.read_table(next((output / "training").glob("*.parquet"))).to_pylist()
    (example,) = training
    assert example["item_id"] == "good"
    assert len(example["latents"]) == _numel(example["latents_shape"])
    assert len(example["prompt_embeds"]) == _numel(example["prompt_embeds_shape"])

    write_dataset(dataset, [*rows, {"prompt": PROMPTS[2], "item_id": "new"}])
    state = bulk(**run, return_state=True)
    assert state.is_failed()  # the bad rows are still bad
    manifest = read_manifest(str(output))
    assert (manifest["good"]["status"], manifest["new"]["status"]) == ("succeeded", "succeeded")
    states = task_states(state.state_details.flow_run_id)
    assert not [name for name in states if name.endswith("-good")]
    assert states["write-video-shard-00001-new"] == ["Completed"]


def _numel(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def test_ids_never_share_a_video_a_lost_video_is_made_again_and_other_rows_are_kept(
        prefect_server, tiny_wan_path: Path, tmp_path: Path) -> None:
    # Same prompt and seed, ids that one slug would merge, different guidance: two videos.
    rows = [{"prompt": PROMPTS[0], "item_id": item_id, "seed": 1, "guidance_scale": guidance}
            for item_id, guidance in (("a/b", 3.0), ("a-b", 5.0))]
    output = tmp_path / "out"
    run = dict(output=str(output), model_path=str(tiny_wan_path), **TINY)
    state = bulk(dataset=str(write_dataset(tmp_path / "first.jsonl", rows)), **run,
                 return_state=True)
    assert state.is_completed(), state.message
    first = read_manifest(str(output))
    assert [(row["item_id"], row["row"]) for row in first.values()] == [("a/b", 0), ("a-b", 1)]
    assert len({row["video_uri"] for row in first.values()}) == 2
    videos = {item_id: _video_path(row) for item_id, row in first.items()}
    for item_id, path in videos.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == first[item_id]["video_sha256"]

    # A deleted video is made again (only its write-video step runs), not carried over.
    videos["a/b"].unlink()
    state = bulk(dataset=str(tmp_path / "first.jsonl"), **run, return_state=True)
    assert state.is_completed(), state.message
    assert state.result()["made"] == 1
    assert hashlib.sha256(videos["a/b"].read_bytes()).hexdigest() == first["a/b"]["video_sha256"]
    states = task_states(state.state_details.flow_run_id)
    assert states["decode-shard-00000-a/b"] == ["Cached"]
    assert states["write-video-shard-00000-a/b"] == ["Completed"]

    # Another dataset into the same output: its rows are added, the earlier ones kept.
    other = write_dataset(tmp_path / "second.jsonl", [{"prompt": PROMPTS[1], "item_id": "c"}])
    state = bulk(dataset=str(other), **run, return_state=True)
    assert state.is_completed(), state.message
    manifest = read_manifest(str(output))
    assert list(manifest) == ["a/b", "a-b", "c"]
    assert manifest["a-b"] == first["a-b"] and manifest["c"]["row"] == 0


def test_run_fatal_problems_stop_the_run_at_its_start(prefect_server, tiny_wan_path: Path,
                                                      tmp_path: Path) -> None:
    dataset = tmp_path / "typo.csv"
    dataset.write_text(f"prompt,guidance\n{PROMPTS[0]},3\n")
    run = dict(model_path=str(tiny_wan_path), return_state=True, **TINY)
    state = bulk(dataset=str(dataset), output=str(tmp_path / "typo"), **run)
    assert state.is_failed()
    assert "unknown columns ['guidance']" in str(state.result(raise_on_failure=False))
    state = bulk(dataset=str(dataset), output=str(tmp_path / "typo"), **run,
                 allow_unknown_columns=True)
    assert state.is_completed(), state.message

    model = tmp_path / "model"
    shutil.copytree(tiny_wan_path, model)
    weights = next((model / "transformer").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1000])
    dataset = write_dataset(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    state = bulk(dataset=str(dataset), output=str(tmp_path / "out"),
                 **{**run, "model_path": str(model)})
    assert state.is_failed()
    assert f"cannot read safetensors file {weights}" in str(state.result(raise_on_failure=False))
    stages = ("encode", "prepare-latents", "denoise", "decode", "write")
    assert not [n for n in task_states(state.state_details.flow_run_id) if n.startswith(stages)]
    assert not (tmp_path / "out" / "manifest.parquet").exists()


def _video_path(row: dict) -> Path:
    return Path(urlsplit(row["video_uri"]).path)
