"""From a prompt dataset (parquet, JSONL or CSV) to the items a run must still make.

Each row needs a `prompt`; it may set `negative_prompt`, `seed`, `item_id` and any
sampling option (`height`, `width`, `num_frames`, `num_inference_steps`,
`guidance_scale`, `guidance_end`, `max_sequence_length`, `image`,
`embedded_guidance_scale`); the run's options fill in the rest.
Cells are read strictly as their column's type (`tasks.dataset_table`).

* `item_id` is kept as the text given (an integer id `1` stays `"1"`). When not given it
  is a digest of the row's given values (a repeat of the same row gets `-1`, `-2`, ...),
  so appending rows never renames the existing ones.
* `seed`, when not given, derives from the run's seed and the item id: deterministic
  per item, different between items.
* A row with a bad value (wrong type, NaN, out of range) becomes an invalid item whose
  error names the column and value (it goes to the manifest). A dataset without a
  `prompt` column, or with columns the request schema does not know (typos such as
  `guidance`), is refused as a whole, unless unknown columns are allowed.
* Items the output's manifest already lists as succeeded with the same options, whose
  video is still there with its digest, are carried over, not redone: rerunning over a
  grown dataset makes only the new rows, and a lost video is made again.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from fastvideo.fastvideo_args import NEUTRAL_OPTIONS, SamplingParam
from fastvideo.jobs.items import ItemSpec, Shard
from fastvideo.storage.uri import split_uri
from tasks.common import get_store, retry_on_store_unavailable, run_logger
from tasks.dataset_table import COLUMN_TYPES, parse_cell, read_table
from tasks.manifest import MANIFEST_KEY, SUCCEEDED, lost_videos, read_manifest

# The request schema is SamplingParam's: a row may set any of its options.
ROW_FIELDS = ("prompt", "item_id", *SamplingParam.option_names())
assert set(ROW_FIELDS) == set(COLUMN_TYPES), "every row field needs a column type"


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
    """Manifest rows of items already made by an earlier run (their video verified)."""
    num_rows: int = 0


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
              dataset: str | None = None, row: int | None = None) -> ItemSpec:
    """Resolve one row's given values against the run's options; ValueError names a bad
    value."""
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
    return ItemSpec(item_id=item_id, prompt=prompt, shared_negative=shared, params=params,
                    row=row)


def parse_row(record: dict[str, Any], text: bool = False) -> tuple[dict[str, Any], list[str]]:
    """A row's known cells as their columns' types (None: not given), and an error per
    bad cell."""
    given: dict[str, Any] = {}
    errors: list[str] = []
    for column, value in record.items():
        if column not in COLUMN_TYPES or value is None:
            continue
        try:
            given[column] = parse_cell(column, value, text)
        except ValueError as exc:
            errors.append(str(exc))
    if given.get("item_id") == "":
        del given["item_id"]
        errors.append("column 'item_id': '' is empty")
    return given, errors


def parse_rows(records: list[dict[str, Any]], defaults: SamplingParam,
               dataset: str | None = None, text: bool = False,
               row_errors: dict[int, str] | None = None
               ) -> tuple[list[ItemSpec], list[InvalidItem]]:
    """Items from dataset rows (their given cells; `text`: CSV cells), in order; bad rows
    become `InvalidItem`s, each with its row's errors."""
    items: list[ItemSpec] = []
    invalid: list[InvalidItem] = []
    seen: dict[str, int] = {}
    for row, record in enumerate(records):
        given, errors = parse_row(record, text)
        if row_errors and row in row_errors:
            errors.insert(0, row_errors[row])
        if "item_id" in given:
            item_id = given.pop("item_id")
            if item_id in seen:
                invalid.append(InvalidItem(f"{item_id}#row{row}", row, given.get("prompt"),
                                           f"duplicate item_id {item_id!r} (first at row "
                                           f"{seen[item_id]})"))
                continue
        else:
            # Named by what the row gives (as read, when some of it is bad).
            named = {k: v for k, v in record.items() if k in COLUMN_TYPES and v is not None} \
                if errors else given
            canonical = json.dumps(named, sort_keys=True, default=str)
            base = hashlib.sha256(canonical.encode()).hexdigest()[:16]
            item_id, repeat = base, 0
            while item_id in seen:
                repeat += 1
                item_id = f"{base}-{repeat}"
        seen[item_id] = row
        prompt = given.get("prompt") if isinstance(given.get("prompt"), str) else None
        if errors:
            invalid.append(InvalidItem(item_id, row, prompt, f"row {row}: {'; '.join(errors)}"))
            continue
        try:
            items.append(make_item(given, item_id, defaults, dataset, row))
        except ValueError as exc:
            invalid.append(InvalidItem(item_id, row, prompt, f"row {row}: {exc}"))
    return items, invalid


def _same_request(row: dict[str, Any], item: ItemSpec) -> bool:
    """The manifest row was made with this item's request (an option newer than the row
    counts at its neutral value, `NEUTRAL_OPTIONS`)."""
    return all(row.get(k, NEUTRAL_OPTIONS.get(k)) == v for k, v in item.request().items())


def make_shards(items: list[ItemSpec], shard_size: int) -> list[Shard]:
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [Shard(index=i // shard_size, items=tuple(items[i:i + shard_size]))
            for i in range(0, len(items), shard_size)]


def check_columns(dataset: str, columns: list[str], allow_unknown: bool) -> list[str]:
    """The dataset's columns the request schema does not know (allowed: ignored); refused
    unless `allow_unknown`, as is a dataset without a `prompt` column."""
    if "prompt" not in columns:
        raise ValueError(f"dataset {dataset} has no 'prompt' column (columns: {columns}); "
                         "every row needs a prompt")
    unknown = [c for c in columns if c not in COLUMN_TYPES]
    if unknown and not allow_unknown:
        hints = [f"{c!r} -> {' or '.join(map(repr, close))}" for c in unknown
                 if (close := near_names(c))]
        raise ValueError(
            f"dataset {dataset}: unknown columns {unknown}"
            + (f" (did you mean {', '.join(hints)}?)" if hints else "")
            + f"; known columns: {list(ROW_FIELDS)}. Rename them, or ignore them with "
            "--allow-unknown-columns (flow parameter allow_unknown_columns=True)")
    return unknown


def near_names(column: str) -> list[str]:
    """The row fields `column` may be a typo of: the closest, and the next one when about as
    close (`guidance` -> `guidance_end` or `guidance_scale`)."""
    def ratio(name: str) -> float:
        return difflib.SequenceMatcher(None, column, name).ratio()

    close = difflib.get_close_matches(column, ROW_FIELDS, n=2)
    return [name for name in close if ratio(name) >= ratio(close[0]) - 0.1]


@task(name="plan-items", cache_policy=NO_CACHE, persist_result=False, retries=3,
      retry_delay_seconds=2, retry_condition_fn=retry_on_store_unavailable)
def plan_items(dataset: str, output_uri: str, defaults: SamplingParam,
               allow_unknown_columns: bool = False) -> Plan:
    """Read the dataset and the output's manifest; return what this run must make."""
    logger = run_logger()
    table = read_table(dataset)
    ignored = check_columns(dataset, table.columns, allow_unknown_columns)
    if ignored:
        logger.warning("dataset %s: ignoring columns %s (known: %s)", dataset, ignored,
                       list(ROW_FIELDS))
    items, invalid = parse_rows(table.rows, defaults, dataset, table.text, table.row_errors)
    output = get_store(output_uri)
    manifest = read_manifest(output)
    done = {row["item_id"]: row for row in manifest if row.get("status") == SUCCEEDED}
    ours = {item.item_id for item in items} | {item.item_id for item in invalid}
    others = sum(row["item_id"] not in ours for row in manifest)
    if others:
        logger.info("%s: %d row(s) of items not in this dataset are kept as they are",
                    MANIFEST_KEY, others)
    candidates = {item.item_id: done[item.item_id] for item in items
                  if item.item_id in done and _same_request(done[item.item_id], item)}
    lost = lost_videos(output, list(candidates.values()))
    plan = Plan(num_rows=len(table.rows), invalid=invalid)
    for item in items:
        if item.item_id in candidates and item.item_id not in lost:
            plan.carried.append({**candidates[item.item_id], "row": item.row})
        else:
            plan.items.append(item)
    logger.info("dataset %s: %d rows, %d to make, %d already made (%s, videos verified), "
                "%d invalid", dataset, len(table.rows), len(plan.items), len(plan.carried),
                MANIFEST_KEY, len(invalid))
    if lost:
        first = next(iter(lost.items()))
        logger.warning("%d video(s) of finished items are missing or changed, made again "
                       "(first: item %s: %s)", len(lost), *first)
    return plan
