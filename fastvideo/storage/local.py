"""`LocalStore`: an `ArtifactStore` in a local (or shared, POSIX) folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

from fastvideo.storage.base import ArtifactStore, check_key
from fastvideo.storage.errors import ObjectNotFoundError, StoreError

# In-progress writes carry this name prefix; `list` hides them.
_TMP_PREFIX = ".tmp-"


class LocalStore(ArtifactStore):
    """Objects are files under `root`; a write goes to a temp file, then `os.replace`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise StoreError(f"store folder {self.root} is a file") from None
        except OSError as exc:
            raise StoreError(f"cannot create store folder {self.root}: {exc.strerror}") from None

    @classmethod
    def from_uri(cls, uri: str) -> LocalStore:
        if "://" not in uri:
            return cls(uri)
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"file URI {uri!r} names host {parts.netloc!r}; use file:///abs/path")
        return cls(unquote(parts.path))

    @property
    def root_uri(self) -> str:
        return self.root.as_uri()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write_atomically(key, lambda f: f.write(data))

    def put_file(self, key: str, path: str | Path) -> None:
        with open(path, "rb") as src:
            self._write_atomically(key, lambda f: shutil.copyfileobj(src, f))

    def _write_atomically(self, key: str, write: Callable[[BinaryIO], object]) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Same folder as the destination, so os.replace is a rename within one filesystem.
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=_TMP_PREFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())  # the rename must not land before the data
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ObjectNotFoundError(f"no object {self.uri(key)}") from exc

    def get_file(self, key: str, path: str | Path) -> None:
        try:
            shutil.copyfile(self._path(key), path)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ObjectNotFoundError(f"no object {self.uri(key)}") from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        # Walk only the folder the prefix points into; the rest is a string-prefix filter.
        start = self.root / check_key(prefix.rsplit("/", 1)[0]) if "/" in prefix else self.root
        keys = []
        for dirpath, _, filenames in os.walk(start):
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.startswith(_TMP_PREFIX):
                    continue
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)
