"""Content digests of large files (model weights), computed once per version of a file.

Hashing a model's gigabytes of weights on every run would take minutes, so a file's
sha256 is remembered in a small JSON file outside the model folder (which may be
read-only): `$FASTVIDEO_CACHE_DIR/file-digests.json`, default `~/.cache/fastvideo`. An
entry holds for the file at that absolute path while its size, mtime, ctime and inode
stay the same: a write, a replacement or a copy over it changes at least one of them
(tools that keep a file's mtime, `cp -p` or `rsync -t`, still change its ctime), and the
file is hashed again. A file changed in the last seconds is not remembered: a change
within the file system's timestamp granularity could keep every stamp (git's "racy"
entries). Without a writable cache folder every call hashes the files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = "FASTVIDEO_CACHE_DIR"
_CACHE_NAME = "file-digests.json"
# Older than this, a file's stamps tell any later change (timestamps tick far faster).
_SETTLED_NS = 2_000_000_000


def cache_path() -> Path:
    folder = os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "fastvideo"
    return Path(folder) / _CACHE_NAME


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def cached_sha256s(paths: Sequence[Path]) -> list[str]:
    """The sha256 of each file's content: from the cache while the file is unchanged,
    else hashed (and remembered)."""
    cache = cache_path()
    entries = _load(cache)
    digests: list[str] = []
    changed = False
    for path in paths:
        key = str(path.resolve())
        stamp = _stamp(path)
        entry = entries.get(key)
        if entry is not None and entry.get("stamp") == stamp:
            digests.append(entry["sha256"])
            continue
        logger.info("hashing %s (%.1f MB; once per version of the file)", path,
                    stamp[0] / 1e6)
        digest = file_sha256(path)
        digests.append(digest)
        # Not written to while it was read, nor too recently to tell the next write.
        if _stamp(path) == stamp and time.time_ns() - max(stamp[1:3]) > _SETTLED_NS:
            entries[key] = {"stamp": stamp, "sha256": digest}
            changed = True
    if changed:
        _save(cache, {k: v for k, v in entries.items() if Path(k).is_file()})
    return digests


def _load(cache: Path) -> dict[str, dict]:
    try:
        entries = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}  # none yet, unreadable or damaged: hash again
    return entries if isinstance(entries, dict) else {}


def _save(cache: Path, entries: dict[str, dict]) -> None:
    # Atomic, so a concurrent reader sees a whole file; a concurrent writer's entries may
    # be lost, which costs a hash, never a wrong digest.
    tmp = None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=f".{cache.name}.")
        with os.fdopen(fd, "w") as f:
            json.dump(entries, f)
        os.replace(tmp, cache)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        logger.warning("cannot remember file digests in %s (%s): weights are hashed on "
                       "every run; set %s to a writable folder", cache, exc, CACHE_DIR_ENV)
