"""Artifact stores (local folder, S3) and ForwardBatch checkpoints in them.

Names load on first use: the keys and the stores import neither torch nor pyarrow, and a
command's first act (a warm worker's spec holds the model's fingerprint) needs only those.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "fastvideo.storage.base": ("ArtifactStore", "open_store"),
    "fastvideo.storage.checkpoint": (
        "CheckpointRef", "CorruptInputError", "delete_checkpoint", "find_checkpoint",
        "load_valid_checkpoint", "read_checkpoint", "read_inputs", "write_checkpoint",
        "write_encoded"),
    "fastvideo.storage.errors": (
        "CheckpointNotFoundError", "CorruptCheckpointError", "ObjectNotFoundError",
        "StoreError", "StoreUnavailableError"),
    "fastvideo.storage.keys": ("checkpoint_key", "model_fingerprint"),
    "fastvideo.storage.local": ("LocalStore",),
    "fastvideo.storage.retry": ("retry_io",),
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'fastvideo.storage' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
