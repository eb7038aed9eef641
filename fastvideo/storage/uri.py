"""One way to name a single file: a local path or a store URI (`s3://bucket/dir/a.png`,
`file:///data/a.png`), split into the store that holds it and its key, and read whole."""

from __future__ import annotations

from pathlib import Path

from fastvideo.storage.base import open_store
from fastvideo.storage.errors import ObjectNotFoundError
from fastvideo.storage.retry import retry_io


def split_uri(uri: str) -> tuple[str, str]:
    """A file's store root and key: `s3://b/p/data.jsonl` -> (`s3://b/p`, `data.jsonl`),
    `file:///a.png` -> (`file:///`, `a.png`), `dir/a.png` -> (`dir`, `a.png`)."""
    if "://" not in uri:
        path = Path(uri)
        return str(path.parent), path.name
    root, _, key = uri.rpartition("/")
    if not key or root.endswith(":/"):
        raise ValueError(f"URI {uri!r} names no file; use e.g. s3://bucket/dir/file.png")
    return (root + "/" if root.endswith("//") else root), key


def read_uri(uri: str, what: str = "file") -> bytes:
    """The bytes of a local file or a store object; FileNotFoundError names a missing one
    as `what` (e.g. "image")."""
    if "://" not in uri:
        path = Path(uri)
        if not path.is_file():
            raise FileNotFoundError(f"{what} {uri} does not exist")
        return path.read_bytes()
    root, key = split_uri(uri)
    try:
        return retry_io(lambda: open_store(root).get_bytes(key))
    except ObjectNotFoundError:
        raise FileNotFoundError(f"{what} {uri} does not exist") from None
