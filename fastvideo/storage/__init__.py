"""Artifact stores (local folder, S3) and ForwardBatch checkpoints in them."""

from fastvideo.storage.base import ArtifactStore, open_store
from fastvideo.storage.checkpoint import (
    CheckpointRef,
    CorruptInputError,
    delete_checkpoint,
    find_checkpoint,
    load_valid_checkpoint,
    read_checkpoint,
    read_inputs,
    write_checkpoint,
    write_encoded,
)
from fastvideo.storage.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    ObjectNotFoundError,
    StoreError,
    StoreUnavailableError,
)
from fastvideo.storage.keys import checkpoint_key, model_fingerprint
from fastvideo.storage.local import LocalStore
from fastvideo.storage.retry import retry_io

__all__ = [
    "ArtifactStore",
    "CheckpointNotFoundError",
    "CheckpointRef",
    "CorruptCheckpointError",
    "CorruptInputError",
    "LocalStore",
    "ObjectNotFoundError",
    "StoreError",
    "StoreUnavailableError",
    "checkpoint_key",
    "delete_checkpoint",
    "find_checkpoint",
    "load_valid_checkpoint",
    "model_fingerprint",
    "open_store",
    "read_checkpoint",
    "read_inputs",
    "retry_io",
    "write_checkpoint",
    "write_encoded",
]
