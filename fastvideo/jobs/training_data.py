"""The training parquet: for each finished item, the fields its pipeline's phases mark for
training (`Phase.training`: for Wan, the prompt embeddings and the final latents), as
float32 lists with their shapes, one part per shard under `<output>/training/`.

Written where the phases ran (the flow's process, or the warm worker on a GPU node), since
only there is the pipeline, and so its phases, known.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from fastvideo.jobs.items import ItemResult, Shard
from fastvideo.pipelines.phases import Phase
from fastvideo.storage import ArtifactStore, read_inputs, retry_io

TRAINING_PREFIX = "training"


def _flat(tensor: torch.Tensor) -> tuple[list[float], list[int]]:
    return tensor.float().flatten().tolist(), list(tensor.shape)


def training_rows(store: ArtifactStore, shard: Shard, phases: Sequence[Phase],
                  results: Mapping[str, list[ItemResult]]) -> list[dict[str, Any]]:
    """A row per item whose every phase succeeded: its request and its training fields."""
    rows: list[dict[str, Any]] = []
    marked = [p for p in phases if p.training]
    if not marked:  # the pipeline gives nothing to train on
        return rows
    for i, item in enumerate(shard.items):
        if not all(results[p.name][i].ok for p in phases if p.name in results):
            continue
        row: dict[str, Any] = {"item_id": item.item_id, **item.request()}
        for phase in marked:
            batch = read_inputs(store, [results[phase.name][i].ref])
            for name in phase.training:
                value = getattr(batch, name)
                if isinstance(value, torch.Tensor):
                    row[name], row[f"{name}_shape"] = _flat(value[0])
                else:
                    row[name] = value
        rows.append(row)
    return rows


def write_training_part(store: ArtifactStore, output: ArtifactStore, shard: Shard,
                        phases: Sequence[Phase], results: Mapping[str, list[ItemResult]]
                        ) -> str | None:
    """Write the shard's part; its URI, or None when no item of the shard finished."""
    rows = training_rows(store, shard, phases, results)
    if not rows:
        return None
    names = hashlib.sha256("|".join(r["item_id"] for r in rows).encode()).hexdigest()[:16]
    key = f"{TRAINING_PREFIX}/part-{names}.parquet"
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    retry_io(lambda: output.put_bytes(key, sink.getvalue().to_pybytes()))
    return output.uri(key)
