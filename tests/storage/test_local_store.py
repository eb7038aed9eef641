"""LocalStore semantics, open_store URI dispatch and retry_io."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastvideo.storage import (
    LocalStore,
    ObjectNotFoundError,
    StoreError,
    StoreUnavailableError,
    open_store,
    retry_io,
)


def test_put_get_list_delete(local_store: LocalStore) -> None:
    local_store.put_bytes("a/b/c.bin", b"123")
    local_store.put_bytes("a/bc.bin", b"4")
    local_store.put_bytes("a/b/c.bin", b"replaced")
    assert local_store.get_bytes("a/b/c.bin") == b"replaced"
    assert local_store.exists("a/b/c.bin") and not local_store.exists("a/b")
    assert local_store.list("a/b") == ["a/b/c.bin", "a/bc.bin"]  # string prefix, as in S3
    assert local_store.list("a/b/") == ["a/b/c.bin"]
    assert local_store.list() == ["a/b/c.bin", "a/bc.bin"]
    local_store.delete("a/b/c.bin")
    local_store.delete("a/b/c.bin")  # deleting twice is fine
    assert local_store.list("a/") == ["a/bc.bin"]
    with pytest.raises(ObjectNotFoundError, match="a/b/c.bin"):
        local_store.get_bytes("a/b/c.bin")


def test_files_round_trip(local_store: LocalStore, tmp_path: Path) -> None:
    src = tmp_path / "video.mp4"
    src.write_bytes(b"\0\1" * 1000)
    local_store.put_file("videos/v.mp4", src)
    local_store.get_file("videos/v.mp4", tmp_path / "back.mp4")
    assert (tmp_path / "back.mp4").read_bytes() == src.read_bytes()
    with pytest.raises(ObjectNotFoundError):
        local_store.get_file("videos/missing.mp4", tmp_path / "x")


def test_failed_write_leaves_no_trace(local_store: LocalStore, tmp_path: Path) -> None:
    local_store.put_bytes("k", b"old")
    with pytest.raises(IsADirectoryError):
        local_store.put_file("k", tmp_path)  # reading a folder fails mid-write
    assert local_store.get_bytes("k") == b"old"
    assert sorted(p.name for p in local_store.root.iterdir()) == ["k"]  # no temp file left


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "a/../b", "./a", "a/"])
def test_invalid_keys_rejected(local_store: LocalStore, key: str) -> None:
    with pytest.raises(ValueError, match="invalid store key"):
        local_store.put_bytes(key, b"x")


def test_list_cannot_escape_the_root(local_store: LocalStore) -> None:
    with pytest.raises(ValueError, match="invalid store key"):
        local_store.list("../")


def test_open_store_local_forms(tmp_path: Path) -> None:
    plain = open_store(tmp_path / "s")
    assert isinstance(plain, LocalStore) and plain.root == (tmp_path / "s").resolve()
    via_uri = open_store(plain.root_uri)
    assert isinstance(via_uri, LocalStore) and via_uri.root == plain.root
    assert plain.uri("x/y") == f"{plain.root.as_uri()}/x/y"


def test_open_store_unknown_scheme() -> None:
    with pytest.raises(ValueError, match=r"'gs'.*file://, s3://"):
        open_store("gs://bucket/prefix")
    with pytest.raises(ValueError, match="empty store URI"):
        open_store("")


def test_retry_io_retries_only_transient_errors() -> None:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise StoreUnavailableError("down")
        return "ok"

    assert retry_io(flaky, attempts=3, backoff=0.0) == "ok" and len(calls) == 3

    calls.clear()
    with pytest.raises(StoreUnavailableError):
        retry_io(flaky, attempts=2, backoff=0.0)
    assert len(calls) == 2

    def broken() -> None:
        calls.append(1)
        raise StoreError("bad credentials")

    calls.clear()
    with pytest.raises(StoreError, match="bad credentials"):
        retry_io(broken, attempts=5, backoff=0.0)
    assert len(calls) == 1
