"""Exceptions of the storage layer.

`StoreUnavailableError` is the only one worth retrying (see `retry_io`): the
others mean the configuration, the data or the request is wrong.
"""

from __future__ import annotations


class StoreError(Exception):
    """The store cannot serve the request: bad credentials, missing bucket, bad key."""


class StoreUnavailableError(StoreError):
    """A transient failure (connection refused, timeout, 5xx); retrying may succeed."""


class ObjectNotFoundError(StoreError):
    """No object is stored under the key."""


class CheckpointNotFoundError(StoreError):
    """No checkpoint (no manifest) under the key prefix."""


class CorruptCheckpointError(StoreError):
    """A checkpoint is incomplete or fails its digest check; recompute it."""
