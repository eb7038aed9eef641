"""Reading a prompt dataset (parquet, JSONL or CSV) cell by cell, each column typed strictly.

No reader infers a column's type from its values, so no row changes another: parquet keeps
each column's own type, JSONL each value's JSON type, and CSV cells stay text until
`parse_cell` reads them as their column's type (`seed` `42` is an integer, `abc` fails
only its row). A missing or null cell (an empty one in CSV) is "not given": the run's
option applies. A file that cannot be read at all (corrupt parquet, invalid JSON, empty)
fails the run with a message naming it.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from fastvideo.fastvideo_args import SamplingParam
from fastvideo.storage import ObjectNotFoundError, retry_io
from fastvideo.storage.uri import split_uri
from tasks.common import get_store

COLUMN_TYPES: dict[str, str] = {
    "prompt": "str", "item_id": "id",
    **{f.name: str(f.type).split(" | ")[0] for f in dataclasses.fields(SamplingParam)},
}
"""The columns a dataset may have: the prompt, the item id, and the request schema's
(`SamplingParam`) options, each with its type."""
FORMATS = (".csv", ".jsonl", ".parquet")
# A float stands for an integer only where it holds it exactly.
_MAX_EXACT_INT = 2**53


@dataclass
class Table:
    """A dataset's rows as read: each a dict of its given cells."""

    uri: str
    columns: list[str]
    rows: list[dict[str, Any]]
    text: bool
    """Cells are text (CSV), read by `parse_cell` as their column's type."""
    row_errors: dict[int, str] = field(default_factory=dict)
    """Rows that could not be split into cells (a CSV line with more cells than columns)."""


def read_table(uri: str) -> Table:
    """A dataset file from a local path or any store URI, by extension; ValueError names
    the file when it cannot be read."""
    root, name = split_uri(uri)
    suffix = "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if suffix not in FORMATS:
        raise ValueError(f"dataset {uri}: unknown format {suffix or '(no extension)'!r}; "
                         f"use one of {list(FORMATS)}")
    try:
        data = retry_io(lambda: get_store(root).get_bytes(name))
    except ObjectNotFoundError:
        raise ValueError(f"dataset {uri} does not exist") from None
    if not data.strip():
        raise ValueError(f"dataset {uri} is empty")
    table = {".csv": _read_csv, ".jsonl": _read_jsonl, ".parquet": _read_parquet}[suffix](
        uri, data)
    if not table.rows and not table.row_errors:
        raise ValueError(f"dataset {uri} has no rows (columns: {table.columns})")
    return table


def _read_csv(uri: str, data: bytes) -> Table:
    try:
        lines = [cells for cells in csv.reader(io.StringIO(_text(uri, data), newline=""))
                 if cells]
    except csv.Error as exc:
        raise ValueError(f"dataset {uri} is not a readable CSV file: {exc}") from None
    header, body = lines[0], lines[1:]
    duplicates = sorted({c for c in header if header.count(c) > 1})
    if duplicates:
        raise ValueError(f"dataset {uri}: columns {duplicates} appear more than once")
    table = Table(uri, header, [], text=True)
    for row, cells in enumerate(body):
        if len(cells) > len(header):
            table.row_errors[row] = (f"{len(cells)} cells for {len(header)} columns (a comma "
                                     "in an unquoted value?)")
            table.rows.append({})
            continue
        table.rows.append({c: v for c, v in zip(header, cells) if v != ""})
    return table


def _read_jsonl(uri: str, data: bytes) -> Table:
    rows: list[dict[str, Any]] = []
    columns: dict[str, None] = {}
    for number, line in enumerate(_text(uri, data).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"dataset {uri} line {number} is not valid JSON: {exc}") from None
        if not isinstance(record, dict):
            raise ValueError(f"dataset {uri} line {number} is not a JSON object: "
                             f"{line[:80]!r}")
        columns.update(dict.fromkeys(record))
        rows.append({k: v for k, v in record.items() if v is not None})
    return Table(uri, list(columns), rows, text=False)


def _text(uri: str, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"dataset {uri} is not UTF-8 text: {exc}") from None


def _read_parquet(uri: str, data: bytes) -> Table:
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"dataset {uri} is not a readable parquet file: {exc}") from None
    # pandas may store its index as a column; it is not data.
    names = [n for n in table.column_names if not n.startswith("__index_level_")]
    rows = [{k: v for k, v in r.items() if v is not None}
            for r in table.select(names).to_pylist()]
    return Table(uri, names, rows, text=False)


def parse_cell(column: str, value: Any, text: bool) -> Any:
    """A cell as its column's type (`COLUMN_TYPES`); ValueError names the column and value.

    Integers take an int, or a float or text holding one exactly (`64.0`); floats take
    a finite number (`nan` fails); strings take a string (text as it is); an `item_id`
    takes a string or an integer, kept as the text it was given (`1`, never `1.0`).
    """
    kind = COLUMN_TYPES[column]
    if text:
        return _parse_text(column, kind, value)
    if kind == "id":
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"column {column!r}: {value!r} is not a string or an integer "
                         f"({type(value).__name__}); write ids as strings")
    if kind == "str":
        if not isinstance(value, str):
            raise ValueError(f"column {column!r}: {value!r} is not a string")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"column {column!r}: {value!r} is not a number")
    if kind == "int":
        return _exact_int(column, value)
    if kind == "float":
        return _finite(column, float(value))
    raise AssertionError(f"column {column!r} has type {kind!r}, which no reader parses")


def _parse_text(column: str, kind: str, value: str) -> Any:
    if kind in ("str", "id"):
        return value
    try:
        number = int(value) if kind == "int" and value.strip().lstrip("+-").isdigit() \
            else float(value)
    except ValueError:
        what = "an integer" if kind == "int" else "a number"
        raise ValueError(f"column {column!r}: {value!r} is not {what}") from None
    return _exact_int(column, number) if kind == "int" else _finite(column, number)


def _exact_int(column: str, value: int | float) -> int:
    if isinstance(value, int):
        return value
    if not (math.isfinite(value) and value.is_integer() and abs(value) <= _MAX_EXACT_INT):
        raise ValueError(f"column {column!r}: {value!r} is not an integer")
    return int(value)


def _finite(column: str, value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"column {column!r}: {value!r} is not a finite number")
    return value
