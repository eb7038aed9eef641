"""`ArtifactStore`: a flat key -> bytes store, and `open_store` to pick a backend by URI.

Keys are relative, `/`-separated paths (`checkpoints/denoise/ab12.../manifest.json`).
Every write is atomic: a reader sees the old object, the new one, or nothing,
never a partial one.
"""

from __future__ import annotations

import abc
import importlib
from pathlib import Path
from urllib.parse import urlsplit

# URI scheme -> "module:Class"; imported on first use so a local run never imports boto3.
_BACKENDS: dict[str, str] = {
    "file": "fastvideo.storage.local:LocalStore",
    "s3": "fastvideo.storage.s3:S3Store",
}


class ArtifactStore(abc.ABC):
    """Bytes under keys. Subclasses map keys onto a folder or a bucket prefix."""

    @classmethod
    @abc.abstractmethod
    def from_uri(cls, uri: str) -> ArtifactStore:
        """Open the store a URI of this backend's scheme names."""

    @property
    @abc.abstractmethod
    def root_uri(self) -> str:
        """The URI that `open_store` turns back into this store."""

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Store `data` under `key`, atomically replacing any previous object."""

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """The object under `key`; `ObjectNotFoundError` if there is none."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys that start with `prefix` (a string prefix, as in S3)."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key`; removing a missing key is not an error."""

    @abc.abstractmethod
    def put_file(self, key: str, path: str | Path) -> None:
        """Upload a local file (streamed, for large outputs such as videos)."""

    @abc.abstractmethod
    def get_file(self, key: str, path: str | Path) -> None:
        """Download `key` to a local file; `ObjectNotFoundError` if there is none."""

    def uri(self, key: str) -> str:
        """Full URI of `key` (for logs, manifests and humans)."""
        check_key(key)
        return f"{self.root_uri.rstrip('/')}/{key}"


def check_key(key: str) -> str:
    """Reject keys that could escape the store root or mean different things per backend."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(
            f"invalid store key {key!r}: use a relative 'a/b/c' path without empty, '.' or '..' parts"
        )
    return key


def open_store(uri: str | Path) -> ArtifactStore:
    """Open the store a URI names: a plain path or `file://...` (local), `s3://bucket/prefix`."""
    uri = str(uri)
    if not uri:
        raise ValueError("empty store URI: give a folder path, file://... or s3://bucket/prefix")
    scheme = urlsplit(uri).scheme if "://" in uri else "file"
    if scheme not in _BACKENDS:
        supported = ", ".join(f"{s}://" for s in _BACKENDS)
        raise ValueError(
            f"unsupported store URI scheme {scheme!r} in {uri!r}; supported: {supported} "
            "or a plain folder path"
        )
    module_name, class_name = _BACKENDS[scheme].split(":")
    backend: type[ArtifactStore] = getattr(importlib.import_module(module_name), class_name)
    return backend.from_uri(uri)
