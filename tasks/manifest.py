"""The run's record: `<output>/manifest.parquet`, one row per item, and the training parquet.

The manifest, not Prefect's database, is the record of every item: a run of a million
prompts makes thousands of task runs, and a million manifest rows.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from prefect import task

from fastvideo.jobs.items import ItemResult, ItemSpec, RunContext, Shard
from fastvideo.storage import ArtifactStore, ObjectNotFoundError, read_inputs, retry_io
from tasks.common import get_store, retry_on_store_unavailable, shard_cache_key

MANIFEST_KEY = "manifest.parquet"
SUCCEEDED = "succeeded"
FAILED = "failed"
# Stage -> manifest column stem; the stages' own names live in tasks.stages / tasks.denoise.
STAGE_COLUMNS = {"encode-text": "text", "prepare-latents": "latents", "denoise": "denoised",
                 "decode": "decoded", "write-video": "video"}

MANIFEST_SCHEMA = pa.schema([
    ("item_id", pa.string()),
    ("prompt", pa.string()),
    ("negative_prompt", pa.string()),
    ("seed", pa.int64()),
    ("height", pa.int64()),
    ("width", pa.int64()),
    ("num_frames", pa.int64()),
    ("num_inference_steps", pa.int64()),
    ("guidance_scale", pa.float64()),
    ("max_sequence_length", pa.int64()),
    ("status", pa.string()),
    ("video_uri", pa.string()),
    ("video_sha256", pa.string()),
    ("failed_stage", pa.string()),
    ("error", pa.string()),
    ("text_checkpoint_uri", pa.string()),
    ("latents_checkpoint_uri", pa.string()),
    ("denoised_checkpoint_uri", pa.string()),
    ("decoded_checkpoint_uri", pa.string()),
    ("text_seconds", pa.float64()),
    ("latents_seconds", pa.float64()),
    ("denoised_seconds", pa.float64()),
    ("decoded_seconds", pa.float64()),
    ("video_seconds", pa.float64()),
    ("denoise_resumed_from_step", pa.int64()),
    ("flow_run_id", pa.string()),
    ("finished_at", pa.string()),
])


def read_manifest(store: ArtifactStore) -> list[dict[str, Any]]:
    """The rows of the store's manifest; none if there is no manifest yet."""
    try:
        data = retry_io(lambda: store.get_bytes(MANIFEST_KEY))
    except ObjectNotFoundError:
        return []
    return pq.read_table(pa.BufferReader(data)).to_pylist()


def item_row(item: ItemSpec, by_stage: dict[str, ItemResult], flow_run_id: str | None
             ) -> dict[str, Any]:
    """The manifest row of an item from its results, stage by stage (last stage last)."""
    final = list(by_stage.values())[-1]
    row: dict[str, Any] = {
        "item_id": item.item_id, "prompt": item.prompt, "negative_prompt": item.negative_prompt,
        "seed": item.seed, **item.sampling,
        "status": SUCCEEDED if final.ok else FAILED,
        "failed_stage": final.failed_stage, "error": final.error,
        "flow_run_id": flow_run_id,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    for stage, stem in STAGE_COLUMNS.items():
        result = by_stage.get(stage)
        done = result is not None and result.ok
        uri_column = "video_uri" if stem == "video" else f"{stem}_checkpoint_uri"
        row[uri_column] = result.ref.uri if done else None
        row[f"{stem}_seconds"] = result.seconds if done else None
    video = by_stage.get("write-video")
    row["video_sha256"] = video.ref.digest if video is not None and video.ok else None
    denoised = by_stage.get("denoise")
    row["denoise_resumed_from_step"] = (denoised.info.get("resumed_from_step")
                                        if denoised is not None and denoised.ok else None)
    return row


def shard_rows(shard: Shard, results: dict[str, list[ItemResult]], flow_run_id: str | None
               ) -> list[dict[str, Any]]:
    return [item_row(item, {stage: rs[i] for stage, rs in results.items()}, flow_run_id)
            for i, item in enumerate(shard.items)]


def failed_row(item_id: str, prompt: str | None, error: str, flow_run_id: str | None
               ) -> dict[str, Any]:
    """The row of an item that never became a request (a bad dataset row)."""
    return {"item_id": item_id, "prompt": prompt, "status": FAILED, "failed_stage": "dataset",
            "error": error, "flow_run_id": flow_run_id,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def manifest_bytes(rows: list[dict[str, Any]]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), sink)
    return sink.getvalue().to_pybytes()


@task(name="write-manifest", persist_result=False, retries=3, retry_delay_seconds=2,
      retry_condition_fn=retry_on_store_unavailable)
def write_manifest(rows: list[dict[str, Any]], output_uri: str) -> str:
    """Replace `<output>/manifest.parquet` (atomically) with `rows`; return its URI."""
    store = get_store(output_uri)
    data = manifest_bytes(rows)
    retry_io(lambda: store.put_bytes(MANIFEST_KEY, data))
    return store.uri(MANIFEST_KEY)


def _flat(tensor: torch.Tensor) -> tuple[list[float], list[int]]:
    return tensor.float().flatten().tolist(), list(tensor.shape)


@task(name="write-training-data", task_run_name="write-training-data-shard-{shard.index:05d}",
      cache_key_fn=shard_cache_key, persist_result=True, result_serializer="json", retries=3,
      retry_delay_seconds=2, retry_condition_fn=retry_on_store_unavailable)
def write_training_data(shard: Shard, ctx: RunContext, text: list[ItemResult],
                        denoised: list[ItemResult]) -> str | None:
    """A parquet of prompt embeddings and final latents (float32, flattened, with shapes) for
    the shard's finished items, under `<output>/training/`; None if none finished."""
    store = get_store(ctx.store_uri)
    rows = []
    for item, t, d in zip(shard.items, text, denoised, strict=True):
        if not (t.ok and d.ok):
            continue
        embeds, embeds_shape = _flat(read_inputs(store, [t.ref]).prompt_embeds[0])
        latents, latents_shape = _flat(read_inputs(store, [d.ref]).latents[0])
        rows.append({"item_id": item.item_id, "prompt": item.prompt, "seed": item.seed,
                     "prompt_embeds": embeds, "prompt_embeds_shape": embeds_shape,
                     "latents": latents, "latents_shape": latents_shape})
    if not rows:
        return None
    names = hashlib.sha256("|".join(r["item_id"] for r in rows).encode()).hexdigest()[:16]
    key = f"training/part-{names}.parquet"
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    output = get_store(ctx.output_uri)
    retry_io(lambda: output.put_bytes(key, sink.getvalue().to_pybytes()))
    return output.uri(key)
