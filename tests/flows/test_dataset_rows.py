"""Datasets read strictly, item identity, the manifest's memory and the run's start checks
(issue 15), without the engine or a Prefect server (`.fn()`)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fastvideo.fastvideo_args import SamplingParam
from fastvideo.jobs.item_phases import safe_name, video_key
from fastvideo.models.loader.component_loader import check_model_files
from fastvideo.storage import open_store
from tasks.dataset import parse_rows, plan_items
from tasks.manifest import failed_row, lost_videos, read_manifest, write_manifest
from tasks.prepare import check_writable

DEFAULTS = SamplingParam(negative_prompt="blurry", height=32, width=32, num_frames=5,
                         num_inference_steps=4, guidance_scale=5.0, seed=11)


def _plan(tmp_path: Path, name: str, text: str, **kwargs):
    dataset = tmp_path / name
    dataset.write_text(text)
    return plan_items.fn(str(dataset), str(tmp_path / "out"), DEFAULTS, **kwargs)


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_integer_ids_stay_as_given_and_appending_renames_nothing(tmp_path: Path) -> None:
    rows = [{"prompt": "a cat", "item_id": 1}, {"prompt": "a dog", "item_id": 3}]
    first = _plan(tmp_path, "a.jsonl", _jsonl(rows)).items
    grown = _plan(tmp_path, "a.jsonl", _jsonl([*rows, {"prompt": "a bird"}])).items
    assert [i.item_id for i in first] == ["1", "3"]
    assert [(i.item_id, i.seed) for i in grown[:2]] == [(i.item_id, i.seed) for i in first]
    # The same in CSV (every cell text: `007` stays `007`) and in parquet with a null id.
    csv = _plan(tmp_path, "a.csv", "item_id,prompt\n1,a cat\n007,a dog\n,a bird\n").items
    assert [i.item_id for i in csv[:2]] == ["1", "007"]
    ids = pa.array([1, None, 3], pa.int64())
    pq.write_table(pa.table({"item_id": ids, "prompt": ["a", "b", "c"]}), tmp_path / "a.parquet")
    plan = plan_items.fn(str(tmp_path / "a.parquet"), str(tmp_path / "out"), DEFAULTS)
    assert [plan.items[0].item_id, plan.items[2].item_id] == ["1", "3"]
    # A float id (pandas' int column with a gap) is not guessed back: its rows fail.
    pq.write_table(pa.table({"item_id": [1.0, None], "prompt": ["a", "b"]}),
                   tmp_path / "f.parquet")
    plan = plan_items.fn(str(tmp_path / "f.parquet"), str(tmp_path / "out"), DEFAULTS)
    assert "column 'item_id': 1.0 is not a string or an integer" in plan.invalid[0].error
    assert len(plan.items) == 1


def test_each_cell_is_parsed_alone_and_bad_values_fail_their_row(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "p.csv", "prompt,seed,guidance_scale,height\n"
                                    "a cat,42,,\n"
                                    "a dog,abc,,\n"
                                    "a bird,,nan,\n"
                                    "a fish,,,0\n"
                                    "a cow,, 3 ,64.0\n"
                                    "\"a, quoted\",7,,\n"
                                    "a, unquoted,7,,\n")
    assert [(i.prompt, i.seed, i.row) for i in plan.items[:1]] == [("a cat", 42, 0)]
    cow = plan.items[1]
    assert (cow.guidance_scale, cow.height, cow.row) == (3.0, 64, 4)
    assert plan.items[2].prompt == "a, quoted"
    errors = {i.row: i.error for i in plan.invalid}
    assert errors[1] == "row 1: column 'seed': 'abc' is not an integer"
    assert errors[2] == "row 2: column 'guidance_scale': nan is not a finite number"
    assert errors[3] == "row 3: height must be a positive integer, got 0"
    assert errors[6].startswith("row 6: 5 cells for 4 columns")
    assert plan.num_rows == 7
    # JSON keeps its types: NaN, a string for a number, a bool for an int fail their row.
    items, invalid = parse_rows([{"prompt": "a", "guidance_scale": float("nan")},
                                 {"prompt": "b", "height": "64"}, {"prompt": "c", "seed": True},
                                 {"prompt": "d", "seed": 7.5}, {"prompt": "e", "seed": None}],
                                DEFAULTS)
    assert [i.prompt for i in items] == ["e"]
    assert [e.error for e in invalid] == [
        "row 0: column 'guidance_scale': nan is not a finite number",
        "row 1: column 'height': '64' is not a number",
        "row 2: column 'seed': True is not a number",
        "row 3: column 'seed': 7.5 is not an integer"]


def test_guidance_end_is_a_row_option_checked_per_row(tmp_path: Path) -> None:
    items, invalid = parse_rows([{"prompt": "a", "guidance_end": 0.5}, {"prompt": "b"},
                                 {"prompt": "c", "guidance_end": 2}], DEFAULTS)
    assert [(i.prompt, i.guidance_end) for i in items] == [("a", 0.5), ("b", 1.0)]
    assert [e.error for e in invalid] == [
        "row 2: guidance_end must be a number in [0, 1], got 2.0"]
    # In CSV too, where the cell is text parsed as the column's type.
    plan = _plan(tmp_path, "g.csv", "prompt,guidance_end\na cat,0.5\na dog,x\n")
    assert [i.guidance_end for i in plan.items] == [0.5]
    assert plan.invalid[0].error == "row 1: column 'guidance_end': 'x' is not a number"


def test_unknown_columns_fail_the_run_unless_allowed(tmp_path: Path) -> None:
    text = "prompt,guidance,num_frame\na cat,3,9\n"
    with pytest.raises(ValueError) as refused:
        _plan(tmp_path, "typo.csv", text)
    message = str(refused.value)
    assert "unknown columns ['guidance', 'num_frame']" in message
    # A name near two fields names both (`guidance_end` is as near as `guidance_scale`).
    assert "(did you mean 'guidance' -> 'guidance_end' or 'guidance_scale', " \
           "'num_frame' -> 'num_frames'?)" in message
    assert "known columns: ['prompt', 'item_id', 'negative_prompt'" in message
    assert "--allow-unknown-columns" in message
    plan = _plan(tmp_path, "typo.csv", text, allow_unknown_columns=True)
    assert (plan.items[0].guidance_scale, plan.items[0].num_frames) == (5.0, 5)


@pytest.mark.parametrize(("name", "data", "expected"), [
    ("empty.csv", b"", "is empty"),
    ("header.csv", b"prompt,seed\n", "has no rows"),
    ("bad.jsonl", b'{"prompt": "a"}\n{"prompt": \n', "line 2 is not valid JSON"),
    ("list.jsonl", b'["a"]\n', "line 1 is not a JSON object"),
    ("latin1.csv", "prompt\ncaf\u00e9\n".encode("latin-1"), "is not UTF-8 text"),
    ("corrupt.parquet", b"PAR1 not really parquet", "is not a readable parquet file"),
])
def test_unreadable_datasets_name_the_file(tmp_path: Path, name: str, data: bytes,
                                           expected: str) -> None:
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ValueError, match=f"dataset {tmp_path / name}.*{expected}"):
        plan_items.fn(str(tmp_path / name), str(tmp_path / "out"), DEFAULTS)


def test_item_ids_map_to_distinct_safe_file_names() -> None:
    items, invalid = parse_rows(
        [{"prompt": "a cat", "item_id": i, "seed": 1}
         for i in ("a/b", "a-b", "..", "x" * 300, "tab\there", "ok_id-1.v2", "-dash", "猫")],
        DEFAULTS)
    assert not invalid
    keys = [video_key(i) for i in items]
    assert len(set(keys)) == len(keys)
    assert keys[1] == "videos/a-b_a-cat_seed1.mp4" and keys[5].startswith("videos/ok_id-1.v2_")
    assert keys[0].startswith("videos/a-b~")
    for key in keys:
        name = key.removeprefix("videos/")
        assert "/" not in name and not name.startswith((".", "-")) and len(name) < 160
        assert name.isascii() and name.isprintable()
    assert safe_name("x" * 300).startswith("x" * 40 + "~")


def test_the_manifest_keeps_rows_of_other_items_and_their_dataset_rows(tmp_path: Path) -> None:
    output = str(tmp_path / "out")
    write_manifest.fn([failed_row("a", "p", "boom", None, row=0),
                       failed_row("b", "q", "boom", None, row=1)], output)
    write_manifest.fn([failed_row("b", "q2", "again", None, row=0),
                       failed_row("c", "r", "boom", None, row=1)], output)
    rows = read_manifest(open_store(output))
    assert [(r["item_id"], r["row"], r["prompt"]) for r in rows] == [
        ("a", 0, "p"), ("b", 0, "q2"), ("c", 1, "r")]


def test_lost_videos_are_found_and_changed_ones_removed(tmp_path: Path) -> None:
    store = open_store(tmp_path / "out")
    rows = []
    for name in ("kept", "gone", "changed"):
        store.put_bytes(f"videos/{name}.mp4", name.encode())
        rows.append({"item_id": name, "video_uri": store.uri(f"videos/{name}.mp4"),
                     "video_sha256": hashlib.sha256(name.encode()).hexdigest()})
    store.delete("videos/gone.mp4")
    store.put_bytes("videos/changed.mp4", b"other bytes")
    rows.append({"item_id": "elsewhere", "video_uri": "s3://bucket/videos/kept.mp4",
                 "video_sha256": rows[0]["video_sha256"]})
    lost = lost_videos(store, rows)
    assert sorted(lost) == ["changed", "elsewhere", "gone"]
    assert "is missing" in lost["gone"] and "is not in this output" in lost["elsewhere"]
    assert "does not match its sha256" in lost["changed"]
    assert not store.exists("videos/changed.mp4")  # so the rerun's write-video is not cached


def test_model_problems_are_found_before_any_work(tiny_wan_path: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_wan_path, model)
    check_model_files(model)
    weights = next((model / "transformer").glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[:-10])
    with pytest.raises(ValueError, match=f"cannot read safetensors file {weights}.*not fully"):
        check_model_files(model)
    weights.write_bytes(data)
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps(
        {**index, "vae": ["diffusers", "AutoencoderKLWan2"]}))
    with pytest.raises(ValueError, match="component 'vae': unknown model class "
                                         "'AutoencoderKLWan2'.*known classes"):
        check_model_files(model)


def test_an_output_that_cannot_be_written_is_refused(tmp_path: Path) -> None:
    output = tmp_path / "out"
    check_writable(str(output))
    assert not list(output.iterdir())  # the probe leaves nothing behind
    output.rmdir()
    output.write_text("x")  # the store is open (cached), its folder now a file
    with pytest.raises(ValueError, match=f"cannot write to {output}: .*File exists"):
        check_writable(str(output))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="store folder .*/file is a file"):
        check_writable(str(tmp_path / "file"))
    with pytest.raises(ValueError, match="cannot create store folder .*/file/sub: Not a dir"):
        check_writable(str(tmp_path / "file" / "sub"))
