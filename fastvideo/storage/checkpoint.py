"""ForwardBatch checkpoints in an `ArtifactStore`, and the small reference to one.

Layout under a key prefix:

    tensors-<nonce>.safetensors   every tensor (see `batch_codec`)
    fields-<nonce>.parquet        one row: every other field, plus schema_version
    manifest.json                 written last: file names, sha256 digests and sizes,
                                  schema version, digest of the whole checkpoint

Each writer names its data files with a fresh nonce, so concurrent writers of
one key never overwrite each other's files: whichever manifest a reader sees
names a complete, immutable set. A writer removes the files of the manifest it
replaced; a reader that loses that race re-reads the manifest and tries again.
The checkpoint digest covers the files' contents, not their names, so equal
batches written by different writers have equal digests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch

from fastvideo.forward_batch import ForwardBatch
from fastvideo.storage.base import ArtifactStore, check_key
from fastvideo.storage.batch_codec import SCHEMA_VERSION, EncodedBatch, decode_batch, encode_batch
from fastvideo.storage.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    ObjectNotFoundError,
    StoreUnavailableError,
)
from fastvideo.storage.keys import checkpoint_key, model_fingerprint
from fastvideo.storage.retry import retry_io

__all__ = [
    "MANIFEST_NAME",
    "CheckpointRef",
    "CorruptInputError",
    "checkpoint_key",
    "delete_checkpoint",
    "find_checkpoint",
    "load_valid_checkpoint",
    "model_fingerprint",
    "read_checkpoint",
    "read_inputs",
    "write_checkpoint",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
_DATA_FILES = {"tensors": "safetensors", "fields": "parquet"}  # role -> file extension
_DATA_FILE_NAME = re.compile(r"(tensors|fields)-[0-9a-f]{16}\.(safetensors|parquet)")
# A reader retries when a concurrent writer replaced the manifest mid-read.
_MAX_READ_ATTEMPTS = 5


@dataclass(frozen=True)
class CheckpointRef:
    """Where a checkpoint is and what it holds; plain strings, so JSON and pickle friendly."""

    store_uri: str  # `open_store(store_uri)` opens the store
    key: str  # the key prefix inside the store
    digest: str  # sha256 of the checkpoint's content

    @property
    def uri(self) -> str:
        return f"{self.store_uri.rstrip('/')}/{self.key}"


@dataclass(frozen=True)
class _FileEntry:
    name: str
    sha256: str
    size: int


@dataclass(frozen=True)
class _Manifest:
    schema_version: int
    digest: str
    files: dict[str, _FileEntry]  # role ("tensors", "fields") -> file


def write_checkpoint(
    store: ArtifactStore,
    key_prefix: str,
    batch: ForwardBatch,
    fields: Iterable[str] | None = None,
) -> CheckpointRef:
    """Store the named fields of `batch` (all when None) under `key_prefix`; manifest last."""
    check_key(key_prefix)
    return write_encoded(store, key_prefix, encode_batch(batch, fields))


def write_encoded(store: ArtifactStore, key_prefix: str, encoded: EncodedBatch) -> CheckpointRef:
    """Store an already encoded batch under `key_prefix` (encoding snapshots the tensors,
    so the upload may happen later, on another thread); manifest last."""
    check_key(key_prefix)
    nonce = secrets.token_hex(8)
    files: dict[str, _FileEntry] = {}
    for role, data in (("tensors", encoded.tensors), ("fields", encoded.fields)):
        name = f"{role}-{nonce}.{_DATA_FILES[role]}"
        store.put_bytes(f"{key_prefix}/{name}", data)
        files[role] = _FileEntry(name, hashlib.sha256(data).hexdigest(), len(data))
    replaced = _current_file_names(store, key_prefix)
    manifest = _Manifest(SCHEMA_VERSION, _content_digest(SCHEMA_VERSION, files), files)
    store.put_bytes(f"{key_prefix}/{MANIFEST_NAME}", _manifest_bytes(manifest))
    for name in replaced - {f.name for f in files.values()}:
        store.delete(f"{key_prefix}/{name}")
    return CheckpointRef(store_uri=store.root_uri, key=key_prefix, digest=manifest.digest)


def find_checkpoint(store: ArtifactStore, key_prefix: str) -> CheckpointRef | None:
    """The checkpoint under `key_prefix`, or None if it has no manifest (data is checked on read)."""
    try:
        manifest = _read_manifest(store, key_prefix)
    except CheckpointNotFoundError:
        return None
    return CheckpointRef(store_uri=store.root_uri, key=key_prefix, digest=manifest.digest)


def read_checkpoint(
    store: ArtifactStore,
    ref_or_prefix: CheckpointRef | str,
    *,
    into: ForwardBatch | None = None,
    device: str | torch.device = "cpu",
) -> ForwardBatch:
    """Load and verify a checkpoint; with `into`, overwrite only the stored fields of that batch.

    Raises `CheckpointNotFoundError` without a manifest, `CorruptCheckpointError` when a
    digest or size differs, a file is missing, or a `CheckpointRef`'s digest is not the
    stored one (the key was rewritten with other content).
    """
    if isinstance(ref_or_prefix, CheckpointRef):
        key_prefix, expected_digest = ref_or_prefix.key, ref_or_prefix.digest
    else:
        key_prefix, expected_digest = ref_or_prefix, None
    check_key(key_prefix)
    where = store.uri(key_prefix)
    for _ in range(_MAX_READ_ATTEMPTS):
        manifest = _read_manifest(store, key_prefix)
        if expected_digest is not None and manifest.digest != expected_digest:
            raise CorruptCheckpointError(
                f"checkpoint {where} has digest {manifest.digest}, the reference expects "
                f"{expected_digest}"
            )
        try:
            data = {role: _read_file(store, key_prefix, e) for role, e in manifest.files.items()}
        except ObjectNotFoundError as exc:
            if _read_manifest(store, key_prefix) == manifest:
                raise CorruptCheckpointError(f"checkpoint {where} is incomplete: {exc}") from exc
            continue  # a concurrent writer replaced it; its files are complete
        try:
            return decode_batch(EncodedBatch(data["tensors"], data["fields"]), into, device)
        except ValueError as exc:
            raise CorruptCheckpointError(f"checkpoint {where} cannot be decoded: {exc}") from exc
    raise StoreUnavailableError(f"checkpoint {where} kept changing while being read; retry")


class CorruptInputError(Exception):
    """An input checkpoint is missing or fails verification; its producer must redo it."""

    def __init__(self, key: str, cause: Exception) -> None:
        super().__init__(f"input checkpoint {key} is unusable: {cause}")
        self.key = key


def load_valid_checkpoint(store: ArtifactStore, key: str
                          ) -> tuple[CheckpointRef, ForwardBatch] | None:
    """The checkpoint under `key` and its batch, or None if absent or corrupt (with a warning).

    For outputs that are recomputed when unusable; store outages still raise (after retries).
    """
    ref = retry_io(lambda: find_checkpoint(store, key))
    if ref is None:
        return None
    try:
        return ref, retry_io(lambda: read_checkpoint(store, ref))
    except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
        logger.warning("ignoring checkpoint %s, recomputing it: %s", store.uri(key), exc)
        return None


def read_inputs(store: ArtifactStore, refs: Sequence[CheckpointRef],
                batch: ForwardBatch | None = None) -> ForwardBatch:
    """Merge the checkpoints into one batch; `CorruptInputError` names an unusable one."""
    batch = batch if batch is not None else ForwardBatch()
    for ref in refs:
        try:
            retry_io(lambda ref=ref: read_checkpoint(store, ref, into=batch))
        except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
            raise CorruptInputError(ref.key, exc) from exc
    return batch


def delete_checkpoint(store: ArtifactStore, key_prefix: str) -> None:
    """Remove a checkpoint: its manifest first, so no reader ever sees it half-deleted."""
    check_key(key_prefix)
    keys = retry_io(lambda: store.list(f"{key_prefix}/"))
    for name in sorted(keys, key=lambda k: not k.endswith(f"/{MANIFEST_NAME}")):
        retry_io(lambda name=name: store.delete(name))


def _read_file(store: ArtifactStore, key_prefix: str, entry: _FileEntry) -> bytes:
    key = f"{key_prefix}/{entry.name}"
    data = store.get_bytes(key)
    if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
        raise CorruptCheckpointError(
            f"checkpoint file {store.uri(key)} fails its digest check "
            f"({len(data)} bytes, manifest says {entry.size})"
        )
    return data


def _read_manifest(store: ArtifactStore, key_prefix: str) -> _Manifest:
    key = f"{key_prefix}/{MANIFEST_NAME}"
    try:
        raw = store.get_bytes(key)
    except ObjectNotFoundError as exc:
        raise CheckpointNotFoundError(f"no checkpoint at {store.uri(key_prefix)}") from exc
    try:
        doc = json.loads(raw)
        files = {role: _FileEntry(**doc["files"][role]) for role in _DATA_FILES}
        manifest = _Manifest(int(doc["schema_version"]), str(doc["digest"]), files)
        names_ok = all(_DATA_FILE_NAME.fullmatch(str(f.name)) for f in files.values())
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptCheckpointError(f"unreadable manifest {store.uri(key)}: {exc}") from exc
    if not names_ok or _content_digest(manifest.schema_version, files) != manifest.digest:
        raise CorruptCheckpointError(f"manifest {store.uri(key)} fails its digest check")
    if manifest.schema_version != SCHEMA_VERSION:
        raise CorruptCheckpointError(
            f"checkpoint {store.uri(key_prefix)} has schema_version {manifest.schema_version}, "
            f"this code reads {SCHEMA_VERSION}"
        )
    return manifest


def _current_file_names(store: ArtifactStore, key_prefix: str) -> set[str]:
    """Data files of the manifest about to be replaced (none if absent or unreadable)."""
    try:
        manifest = _read_manifest(store, key_prefix)
    except (CheckpointNotFoundError, CorruptCheckpointError):
        return set()
    return {f.name for f in manifest.files.values()}


def _content_digest(schema_version: int, files: dict[str, _FileEntry]) -> str:
    # Names carry a per-writer nonce, so leave them out: equal content, equal digest.
    content = {role: {"sha256": f.sha256, "size": f.size} for role, f in sorted(files.items())}
    canonical = json.dumps({"schema_version": schema_version, "files": content}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _manifest_bytes(manifest: _Manifest) -> bytes:
    return json.dumps(asdict(manifest), indent=2, sort_keys=True).encode()
