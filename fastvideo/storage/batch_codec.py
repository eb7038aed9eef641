"""`ForwardBatch` <-> (safetensors bytes, one-row parquet bytes), without pickle.

Tensors (fields and those inside `extra`) go to safetensors, bit-exact with
their dtype; every other field is one parquet column: None/bool/int/float/str
natively, lists and dicts as JSON text (column metadata `encoding=json`).
`extra` may hold tensors, JSON values, or flat dicts of those: its tensors are
stored as `extra/<key>` or `extra/<key>/<subkey>`, the rest as one JSON column.
Encoding is deterministic: equal batches give equal bytes (and digests).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import safetensors.torch
import torch
from safetensors.torch import load as load_safetensors

from fastvideo.forward_batch import ForwardBatch
from fastvideo.storage.schema import SCHEMA_VERSION

SCHEMA_VERSION_COLUMN = "schema_version"
_EXTRA = "extra"
_SEP = "/"  # joins extra's keys into tensor names, so extra's tensor keys must not hold it
_JSON_METADATA = {b"encoding": b"json"}


@dataclass(frozen=True)
class EncodedBatch:
    tensors: bytes  # a safetensors file
    fields: bytes  # a one-row parquet file


def encode_batch(batch: ForwardBatch, fields: Iterable[str] | None = None) -> EncodedBatch:
    """Serialise the named fields of `batch` (all of them when `fields` is None)."""
    tensors: dict[str, torch.Tensor] = {}
    columns = [
        (pa.field(SCHEMA_VERSION_COLUMN, pa.int32()), pa.array([SCHEMA_VERSION], pa.int32()))
    ]
    for name in _checked_field_names(fields):
        value = getattr(batch, name)
        if name == _EXTRA:
            plain, extra_tensors = _split_extra(value)
            tensors.update(extra_tensors)
            columns.append(_json_column(name, plain))
        elif isinstance(value, torch.Tensor):
            tensors[name] = value
        else:
            columns.append(_column(name, value))
    return EncodedBatch(tensors=_save_tensors(tensors), fields=_save_row(columns))


def pinned_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of CUDA `tensor` in pinned host memory, queued on the current stream without
    waiting: record an event after it and wait on that before reading the copy."""
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor.detach(), non_blocking=True)


def snapshot_fields(batch: ForwardBatch, fields: Iterable[str]
                    ) -> tuple[ForwardBatch, Callable[[], None]]:
    """A batch holding copies of the named fields of `batch`, for `encode_batch` later on
    another thread, and `ready()` to call there first.

    CUDA tensors (in `extra`'s dicts and lists too) are copied into pinned host memory
    without waiting for the device: the copies are queued on the current stream after the
    work that computes them, and `ready()` waits for them outside the GIL. So a denoising
    loop that checkpoints its progress never stalls the GPU for it (encoding in the loop
    waits for the queue to drain, then serialises while the GPU idles). CPU tensors are
    cloned: the snapshot never shares memory with the batch, whatever the loop does next.
    """
    copied_from_cuda = False

    def copy(value: Any) -> Any:
        nonlocal copied_from_cuda
        if isinstance(value, torch.Tensor):
            if value.device.type != "cuda":
                return value.detach().clone()
            copied_from_cuda = True
            return pinned_copy(value)
        if isinstance(value, dict):
            return {key: copy(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(copy(item) for item in value)
        return value

    snapshot = ForwardBatch()
    for name in _checked_field_names(fields):
        setattr(snapshot, name, copy(getattr(batch, name)))
    if not copied_from_cuda:
        return snapshot, lambda: None
    done = torch.cuda.Event()
    done.record()
    return snapshot, done.synchronize


def decode_batch(
    encoded: EncodedBatch,
    into: ForwardBatch | None = None,
    device: str | torch.device = "cpu",
) -> ForwardBatch:
    """Rebuild a batch (or overwrite the stored fields of `into`); ValueError if incompatible."""
    batch = into if into is not None else ForwardBatch()
    known = set(ForwardBatch.field_names())
    table = pq.read_table(pa.BufferReader(encoded.fields))
    row = table.to_pylist()[0]
    version = row.pop(SCHEMA_VERSION_COLUMN, None)
    if version != SCHEMA_VERSION:
        raise ValueError(f"schema_version {version}, this code reads {SCHEMA_VERSION}")
    for column in table.schema:
        if column.name == SCHEMA_VERSION_COLUMN:
            continue
        if column.name not in known:
            raise ValueError(f"field {column.name!r} is not a ForwardBatch field")
        value = row[column.name]
        if column.metadata == _JSON_METADATA:
            value = json.loads(value)
        setattr(batch, column.name, value)
    for name, tensor in load_safetensors(encoded.tensors).items():
        tensor = tensor.to(device)
        field, *path = name.split(_SEP)
        if field not in known:
            raise ValueError(f"tensor {name!r} does not belong to a ForwardBatch field")
        if not path:
            setattr(batch, field, tensor)
        elif len(path) == 1:
            batch.extra[path[0]] = tensor
        else:
            batch.extra.setdefault(path[0], {})[path[1]] = tensor
    return batch


def _checked_field_names(fields: Iterable[str] | None) -> list[str]:
    known = ForwardBatch.field_names()
    if fields is None:
        return list(known)
    names = list(dict.fromkeys(fields))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown ForwardBatch fields {unknown}; known: {', '.join(known)}")
    return names


def _split_extra(extra: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Separate `extra` into its JSON part and its tensors (named by their path)."""
    plain: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for key, value in extra.items():
        if isinstance(value, torch.Tensor):
            tensors[_tensor_name(key)] = value
        elif isinstance(value, dict):
            plain[key] = {}
            for sub_key, sub_value in value.items():
                if isinstance(sub_value, torch.Tensor):
                    tensors[_tensor_name(key, sub_key)] = sub_value
                else:
                    plain[key][sub_key] = sub_value
        else:
            plain[key] = value
    return plain, tensors


def _tensor_name(*path: object) -> str:
    for part in path:
        if not isinstance(part, str) or not part or _SEP in part:
            raise ValueError(
                f"ForwardBatch.extra key {part!r} holds a tensor: it must be a non-empty str "
                f"without {_SEP!r}"
            )
    return _SEP.join((_EXTRA, *path))  # type: ignore[arg-type]


def _to_json(where: str, value: Any) -> str:
    # sort_keys: equal dicts built in a different order still give equal bytes.
    try:
        text = json.dumps(value, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{where} is not JSON-serialisable ({exc}); checkpoints hold tensors, JSON values, "
            "and in extra flat dicts of those"
        ) from exc
    if json.loads(text) != value:
        raise ValueError(
            f"{where} changes through JSON (tuples, non-str keys, NaN?); store plain JSON values"
        )
    return text


def _column(name: str, value: Any) -> tuple[pa.Field, pa.Array]:
    if value is None or type(value) in (bool, int, float, str):
        array = pa.array([value])
        return pa.field(name, array.type), array
    if isinstance(value, (list, dict)):
        return _json_column(name, value)
    raise ValueError(
        f"ForwardBatch.{name} holds a {type(value).__name__}: checkpoints take tensors, None, "
        "bool/int/float/str, or JSON-serialisable lists and dicts"
    )


def _json_column(name: str, value: Any) -> tuple[pa.Field, pa.Array]:
    text = _to_json(f"ForwardBatch.{name}", value)
    return pa.field(name, pa.string(), metadata=_JSON_METADATA), pa.array([text], pa.string())


def _save_row(columns: list[tuple[pa.Field, pa.Array]]) -> bytes:
    schema = pa.schema([f for f, _ in columns])
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_arrays([a for _, a in columns], schema=schema), sink)
    return sink.getvalue().to_pybytes()


def _save_tensors(tensors: dict[str, torch.Tensor]) -> bytes:
    prepared: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.numel():
            # safetensors refuses tensors that share memory (e.g. two views of one buffer).
            storage = tensor.untyped_storage().data_ptr()
            if storage in seen_storages:
                tensor = tensor.clone()
            seen_storages.add(tensor.untyped_storage().data_ptr())
        prepared[name] = tensor
    return safetensors.torch.save(prepared, metadata={SCHEMA_VERSION_COLUMN: str(SCHEMA_VERSION)})
