"""Bad datasets and rows, grown datasets, and the training parquet, through the bulk flow."""

from __future__ import annotations

from pathlib import Path

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
