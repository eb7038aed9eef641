"""One file named by a local path or a store URI: split and read the same way everywhere
(datasets, images, file digests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastvideo.storage.uri import read_uri, split_uri


def test_split_uri() -> None:
    assert split_uri("s3://bucket/a/b.jsonl") == ("s3://bucket/a", "b.jsonl")
    assert split_uri("file:///data.csv") == ("file:///", "data.csv")
    assert split_uri("prompts.jsonl") == (".", "prompts.jsonl")
    with pytest.raises(ValueError, match="'s3://bucket/' names no file"):
        split_uri("s3://bucket/")


def test_read_uri_reads_paths_and_store_uris_and_names_a_missing_file(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"hello")
    assert read_uri(str(tmp_path / "a.txt")) == b"hello"
    assert read_uri(f"file://{tmp_path}/a.txt") == b"hello"
    with pytest.raises(FileNotFoundError, match=f"image {tmp_path}/b.png does not exist"):
        read_uri(str(tmp_path / "b.png"), "image")
    with pytest.raises(FileNotFoundError, match=f"file file://{tmp_path}/b.png does not exist"):
        read_uri(f"file://{tmp_path}/b.png")
