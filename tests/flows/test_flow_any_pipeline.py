"""The flows run any pipeline that declares its phases: here one that is not Wan at all
(`fastvideo.testing.noop_pipeline`), with no change to tasks or flows."""

from __future__ import annotations

from pathlib import Path

from fastvideo.testing.noop_pipeline import make_noop_model, register_noop_pipeline
from flows.bulk import bulk
from tests.flows.helpers import read_manifest, task_states, write_dataset


def test_bulk_runs_a_pipeline_it_was_never_written_for(prefect_server, tmp_path: Path) -> None:
    register_noop_pipeline()
    model = make_noop_model(tmp_path / "noop")
    dataset = write_dataset(tmp_path / "prompts.jsonl",
                            [{"prompt": f"item {i}", "item_id": f"i{i}"} for i in range(5)])
    output = tmp_path / "out"
    state = bulk(dataset=str(dataset), output=str(output), model_path=str(model), shard_size=2,
                 training_data=True, return_state=True)
    assert state.is_completed(), state.message
    rows = read_manifest(str(output))
    assert sorted(rows) == [f"i{i}" for i in range(5)]
    row = rows["i0"]
    # The family's defaults filled the request; its phases named the columns.
    assert (row["height"], row["width"], row["num_frames"]) == (16, 16, 1)
    for phase in ("encode_text", "prepare_latents", "denoise", "decode"):
        assert row[f"{phase}_checkpoint_uri"].startswith("file://"), phase
    assert Path(row["video_uri"].removeprefix("file://")).is_file()
    names = set(task_states(state.state_details.flow_run_id))
    assert {"encode-text-shard-00000", "denoise-shard-00002-i4", "write-video-shard-00001"} <= names
    assert not any(name.startswith("encode-negative") for name in names)  # none declared
    assert not (output / "training").exists()  # no phase marks fields for training
