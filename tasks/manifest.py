"""The run's record: `<output>/manifest.parquet`, one row per item, and the training parquet.

The manifest, not Prefect's database, is the record of every item: a run of a million
prompts makes thousands of task runs, and a million manifest rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from fastvideo.fastvideo_args import SamplingParam
from fastvideo.jobs.items import ItemResult, ItemSpec, RunContext, Shard
from fastvideo.jobs.training_data import write_training_part
from fastvideo.pipelines.phases import Phase
from fastvideo.storage import ArtifactStore, ObjectNotFoundError, retry_io
from tasks.common import get_store, retry_on_store_unavailable, shard_cache_key

MANIFEST_KEY = "manifest.parquet"
SUCCEEDED = "succeeded"
FAILED = "failed"
VIDEO_STEP = "write-video"
_ARROW_TYPES = {"int": pa.int64(), "float": pa.float64(), "str": pa.string(), "bool": pa.bool_()}


def _request_columns() -> list[tuple[str, pa.DataType]]:
    """The item, its dataset row (0-based), and the request schema's columns: the prompt
    and SamplingParam's options, typed."""
    columns = [("item_id", pa.string()), ("row", pa.int64()), ("prompt", pa.string())]
    for f in dataclasses.fields(SamplingParam):
        columns.append((f.name, _ARROW_TYPES[str(f.type).split(" | ")[0]]))
    return columns


BASE_SCHEMA = pa.schema([
    *_request_columns(),
    ("status", pa.string()),
    ("video_uri", pa.string()),
    ("video_sha256", pa.string()),
    ("failed_stage", pa.string()),
    ("error", pa.string()),
    ("video_seconds", pa.float64()),
    ("resumed_from_step", pa.int64()),
    ("flow_run_id", pa.string()),
    ("finished_at", pa.string()),
])
"""Every manifest's columns; each phase of the pipeline adds `<phase>_checkpoint_uri`
and `<phase>_seconds` (`encode_text_checkpoint_uri`, ...)."""


def manifest_schema(rows: list[dict[str, Any]]) -> pa.Schema:
    """The base columns, then the phases' columns found in `rows`, in order."""
    names = set(BASE_SCHEMA.names)
    extra: list[tuple[str, pa.DataType]] = []
    for row in rows:
        for key in row:
            if key in names:
                continue
            if key.endswith("_checkpoint_uri"):
                extra.append((key, pa.string()))
            elif key.endswith("_seconds"):
                extra.append((key, pa.float64()))
            else:  # a column of an earlier version's rows: kept, typed by its values
                extra.append((key, pa.array([r.get(key) for r in rows]).type))
            names.add(key)
    return pa.schema([*BASE_SCHEMA, *extra])


def read_manifest(store: ArtifactStore) -> list[dict[str, Any]]:
    """The rows of the store's manifest; none if there is no manifest yet."""
    try:
        data = retry_io(lambda: store.get_bytes(MANIFEST_KEY))
    except ObjectNotFoundError:
        return []
    return pq.read_table(pa.BufferReader(data)).to_pylist()


def item_row(item: ItemSpec, by_stage: dict[str, ItemResult], flow_run_id: str | None
             ) -> dict[str, Any]:
    """The manifest row of an item from its results, step by step (its pipeline's phases,
    then the video), in order."""
    final = list(by_stage.values())[-1]
    row: dict[str, Any] = {
        "item_id": item.item_id, "row": item.row, **item.request(),
        "status": SUCCEEDED if final.ok else FAILED,
        "failed_stage": final.failed_stage, "error": final.error,
        "flow_run_id": flow_run_id,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    for stage, result in by_stage.items():
        done = result.ok and result.ref is not None
        if stage == VIDEO_STEP:
            row["video_uri"] = result.ref.uri if done else None
            row["video_sha256"] = result.ref.digest if done else None
            row["video_seconds"] = result.seconds if done else None
            continue
        column = stage.replace("-", "_")
        row[f"{column}_checkpoint_uri"] = result.ref.uri if done else None
        row[f"{column}_seconds"] = result.seconds if done else None
        if done and "resumed_from_step" in result.info:
            row["resumed_from_step"] = result.info["resumed_from_step"]
    return row


def shard_rows(shard: Shard, results: dict[str, list[ItemResult]], flow_run_id: str | None
               ) -> list[dict[str, Any]]:
    return [item_row(item, {stage: rs[i] for stage, rs in results.items()}, flow_run_id)
            for i, item in enumerate(shard.items)]


def failed_row(item_id: str, prompt: str | None, error: str, flow_run_id: str | None,
               row: int | None = None) -> dict[str, Any]:
    """The row of an item that never became a request (a bad dataset row)."""
    return {"item_id": item_id, "row": row, "prompt": prompt, "status": FAILED,
            "failed_stage": "dataset",
            "error": error, "flow_run_id": flow_run_id,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def manifest_bytes(rows: list[dict[str, Any]]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=manifest_schema(rows)), sink)
    return sink.getvalue().to_pybytes()


def lost_videos(output: ArtifactStore, rows: list[dict[str, Any]]) -> dict[str, str]:
    """Of succeeded manifest rows, those whose video is not in `output` with its sha256:
    item id -> what is wrong. Reads every video (a few at a time). A video whose content
    changed is deleted: write-video's cached result is not used while a video it names is
    gone (`tasks.stages`), so the rerun writes it again."""
    prefix = output.root_uri.rstrip("/") + "/"

    def problem(row: dict[str, Any]) -> str | None:
        uri, digest = row.get("video_uri"), row.get("video_sha256")
        if not uri or not digest:
            return "the manifest names no video"
        if not uri.startswith(prefix):
            return f"video {uri} is not in this output ({output.root_uri})"
        try:
            data = retry_io(lambda: output.get_bytes(uri[len(prefix):]))
        except ObjectNotFoundError:
            return f"video {uri} is missing"
        if hashlib.sha256(data).hexdigest() != digest:
            retry_io(lambda: output.delete(uri[len(prefix):]))
            return f"video {uri} does not match its sha256 {digest} (deleted)"
        return None

    with ThreadPoolExecutor(max_workers=8) as pool:
        problems = list(pool.map(problem, rows))
    return {row["item_id"]: why for row, why in zip(rows, problems) if why is not None}


@task(name="write-manifest", persist_result=False, retries=3, retry_delay_seconds=2,
      retry_condition_fn=retry_on_store_unavailable)
def write_manifest(rows: list[dict[str, Any]], output_uri: str) -> str:
    """Write `<output>/manifest.parquet` (atomically): the existing manifest with the rows
    of `rows`' items replaced in place and their new items after them; rows of items not
    in `rows` (another dataset's, or rows since removed from this one) are kept as they
    are. Return its URI."""
    store = get_store(output_uri)
    updates = {row["item_id"]: row for row in rows}
    merged = [updates.pop(row["item_id"], row) for row in read_manifest(store)]
    data = manifest_bytes([*merged, *updates.values()])
    retry_io(lambda: store.put_bytes(MANIFEST_KEY, data))
    return store.uri(MANIFEST_KEY)


@task(name="write-training-data", task_run_name="write-training-data-shard-{shard.index:05d}",
      cache_key_fn=shard_cache_key, persist_result=True, result_serializer="json", retries=3,
      retry_delay_seconds=2, retry_condition_fn=retry_on_store_unavailable)
def write_training_data(shard: Shard, ctx: RunContext, phases: tuple[Phase, ...],
                        results: dict[str, list[ItemResult]]) -> str | None:
    """The shard's part of the training parquet (see `fastvideo.jobs.training_data`)."""
    return write_training_part(get_store(ctx.store_uri), get_store(ctx.output_uri), shard,
                               phases, results)
