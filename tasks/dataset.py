"""From a prompt dataset (parquet, JSONL or CSV) to the items a run must still make.

Each row needs a `prompt`; it may set `negative_prompt`, `seed`, `item_id` and any
sampling option (`height`, `width`, `num_frames`, `num_inference_steps`,
`guidance_scale`, `max_sequence_length`); the run's options fill in the rest.

* `item_id`, when not given, is a digest of the row's given values (a repeat of the same
  row gets `-1`, `-2`, ...), so appending rows never renames the existing ones.
* `seed`, when not given, derives from the run's seed and the item id: deterministic
  per item, different between items.
* A row with bad values becomes an invalid item (its error goes to the manifest);
  only a dataset without a `prompt` column is refused as a whole.
* Items the output's manifest already lists as succeeded with the same options are
  carried over, not redone: rerunning over a grown dataset makes only the new rows.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from fastvideo.fastvideo_args import SamplingParam
from fastvideo.jobs.items import ItemSpec, Shard
from fastvideo.storage import ObjectNotFoundError, retry_io
from tasks.common import get_store, retry_on_store_unavailable, run_logger
from tasks.manifest import MANIFEST_KEY, SUCCEEDED, read_manifest

# The request schema is SamplingParam's: a row may set any of its options.
ROW_FIELDS = ("prompt", "item_id", *SamplingParam.option_names())
_INT_FIELDS = frozenset(SamplingParam.option_types(int))
_FLOAT_FIELDS = frozenset(SamplingParam.option_types(float))
_READERS = {".parquet": pd.read_parquet, ".jsonl": lambda f: pd.read_json(f, lines=True),
            ".csv": pd.read_csv}


@dataclass(frozen=True)
class InvalidItem:
    """A row that cannot become an item; it is recorded as failed in the manifest."""

    item_id: str
    row: int
    prompt: str | None
    error: str


@dataclass
class Plan:
    items: list[ItemSpec] = field(default_factory=list)
    """Items to make in this run, in dataset order."""
    invalid: list[InvalidItem] = field(default_factory=list)
    carried: list[dict[str, Any]] = field(default_factory=list)
    """Manifest rows of items already made by an earlier run."""
    num_rows: int = 0


def split_uri(uri: str) -> tuple[str, str]:
    """A file's store root and key: `s3://b/p/data.jsonl` -> (`s3://b/p`, `data.jsonl`)."""
    if "://" not in uri:
        path = Path(uri)
        return str(path.parent), path.name
    root, _, name = uri.rpartition("/")
    return (root + "/" if root.endswith("//") else root), name


def read_table(uri: str) -> pd.DataFrame:
    """A dataset file from a local path or any store URI, by extension."""
    root, name = split_uri(uri)
    suffix = "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if suffix not in _READERS:
        raise ValueError(f"dataset {uri}: unknown format {suffix or '(no extension)'!r}; "
                         f"use one of {sorted(_READERS)}")
    try:
        data = retry_io(lambda: get_store(root).get_bytes(name))
    except ObjectNotFoundError:
        raise ValueError(f"dataset {uri} does not exist") from None
    return _READERS[suffix](io.BytesIO(data))


def _given(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _coerce(name: str, value: Any) -> Any:
    """Row values as SamplingParam wants them; integral floats (CSV/NaN columns) become ints."""
    if name in _INT_FIELDS and isinstance(value, float) and value.is_integer():
        return int(value)
    if name in _FLOAT_FIELDS and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def resolve_image(image: Any, dataset: str | None) -> str:
    """A row's `image`: a URI or absolute path as given; a relative path is relative to
    the dataset file's folder (or URI prefix)."""
    if not isinstance(image, str) or not image.strip():
        raise ValueError(f"image must be a path or URI string, got {image!r}")
    if "://" in image or Path(image).is_absolute() or dataset is None:
        return image
    root, _ = split_uri(dataset)
    if "://" in root:
        return f"{root.rstrip('/')}/{image}"
    return str((Path(root) / image).resolve())


def make_item(given: dict[str, Any], item_id: str, defaults: SamplingParam,
              dataset: str | None = None) -> ItemSpec:
    """Resolve one row against the run's options; ValueError names a bad value."""
    prompt = given.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
    negative = given.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise ValueError(f"negative_prompt must be a string, got {negative!r}")
    seed = given.get("seed")
    if seed is None:
        digest = hashlib.sha256(f"{defaults.seed}:{item_id}".encode()).digest()
        seed = int.from_bytes(digest[:4], "big")
    if "image" in given:
        given = {**given, "image": resolve_image(given["image"], dataset)}
    resolved = {name: given.get(name, getattr(defaults, name))
                for name in SamplingParam.option_names()}
    resolved.update(seed=seed, negative_prompt=negative if negative is not None
                    else defaults.negative_prompt or "")
    # SamplingParam checks types and ranges and raises ValueError naming the field.
    params = SamplingParam(**resolved)
    # The run's negative prompt is embedded once, at the run's sequence length.
    shared = negative is None and params.max_sequence_length == defaults.max_sequence_length
    return ItemSpec(item_id=item_id, prompt=prompt, shared_negative=shared, params=params)


def parse_rows(records: list[dict[str, Any]], defaults: SamplingParam,
               dataset: str | None = None) -> tuple[list[ItemSpec], list[InvalidItem]]:
    """Items from dataset rows, in order; bad rows become `InvalidItem`s."""
    items: list[ItemSpec] = []
    invalid: list[InvalidItem] = []
    seen: dict[str, int] = {}
    for row, record in enumerate(records):
        given = {k: _coerce(k, record[k]) for k in ROW_FIELDS if _given(record.get(k))}
        if "item_id" in given:
            item_id = str(given.pop("item_id"))
            if item_id in seen:
                invalid.append(InvalidItem(f"{item_id}#row{row}", row, given.get("prompt"),
                                           f"duplicate item_id {item_id!r} (first at row "
                                           f"{seen[item_id]})"))
                continue
        else:
            canonical = json.dumps(given, sort_keys=True, default=str)
            base = hashlib.sha256(canonical.encode()).hexdigest()[:16]
            item_id, repeat = base, 0
            while item_id in seen:
                repeat += 1
                item_id = f"{base}-{repeat}"
        seen[item_id] = row
        try:
            items.append(make_item(given, item_id, defaults, dataset))
        except ValueError as exc:
            invalid.append(InvalidItem(item_id, row, given.get("prompt"), f"row {row}: {exc}"))
    return items, invalid


def _same_request(row: dict[str, Any], item: ItemSpec) -> bool:
    return all(row.get(k) == v for k, v in item.request().items())


def make_shards(items: list[ItemSpec], shard_size: int) -> list[Shard]:
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [Shard(index=i // shard_size, items=tuple(items[i:i + shard_size]))
            for i in range(0, len(items), shard_size)]


@task(name="plan-items", cache_policy=NO_CACHE, persist_result=False, retries=3,
      retry_delay_seconds=2, retry_condition_fn=retry_on_store_unavailable)
def plan_items(dataset: str, output_uri: str, defaults: SamplingParam) -> Plan:
    """Read the dataset and the output's manifest; return what this run must make."""
    logger = run_logger()
    table = read_table(dataset)
    if "prompt" not in table.columns:
        raise ValueError(f"dataset {dataset} has no 'prompt' column (columns: "
                         f"{list(table.columns)}); every row needs a prompt")
    ignored = sorted(set(table.columns) - set(ROW_FIELDS))
    if ignored:
        logger.warning("dataset %s: ignoring columns %s (known: %s)", dataset, ignored,
                       list(ROW_FIELDS))
    items, invalid = parse_rows(table.to_dict(orient="records"), defaults, dataset)
    done = {row["item_id"]: row for row in read_manifest(get_store(output_uri))
            if row.get("status") == SUCCEEDED}
    plan = Plan(num_rows=len(table), invalid=invalid)
    for item in items:
        row = done.get(item.item_id)
        if row is not None and _same_request(row, item):
            plan.carried.append(row)
        else:
            plan.items.append(item)
    logger.info("dataset %s: %d rows, %d to make, %d already made (%s), %d invalid",
                dataset, len(table), len(plan.items), len(plan.carried), MANIFEST_KEY,
                len(invalid))
    return plan
