"""Artifact stores (local folder, S3) and ForwardBatch checkpoints in them."""

from fastvideo.storage.base import ArtifactStore, open_store
from fastvideo.storage.checkpoint import (
    CheckpointRef,
    find_checkpoint,
    read_checkpoint,
    write_checkpoint,
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
    "LocalStore",
    "ObjectNotFoundError",
    "StoreError",
    "StoreUnavailableError",
    "checkpoint_key",
    "find_checkpoint",
    "model_fingerprint",
    "open_store",
    "read_checkpoint",
    "retry_io",
    "write_checkpoint",
]
