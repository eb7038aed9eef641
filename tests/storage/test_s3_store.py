"""S3Store and checkpoints against a real SeaweedFS S3 server on loopback."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fastvideo.forward_batch import ForwardBatch
from fastvideo.storage import (
    CorruptCheckpointError,
    ObjectNotFoundError,
    StoreError,
    StoreUnavailableError,
    open_store,
    read_checkpoint,
    retry_io,
    write_checkpoint,
)
from fastvideo.storage.s3 import S3Store
from tests.s3_server import S3Endpoint, free_ports

KEY = "checkpoints/test/abc"


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and every cause/context behind it."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def test_store_operations(s3_env: S3Endpoint, tmp_path: Path) -> None:
    bucket = s3_env.create_bucket()
    store = open_store(f"s3://{bucket}/runs/r1")
    assert isinstance(store, S3Store) and store.root_uri == f"s3://{bucket}/runs/r1"
    store.put_bytes("a/b.bin", b"123")
    store.put_bytes("a/bc.bin", b"4")
    assert store.get_bytes("a/b.bin") == b"123"
    assert store.exists("a/b.bin") and not store.exists("a/zz")
    assert store.list("a/b") == ["a/b.bin", "a/bc.bin"]
    assert s3_env.client().get_object(Bucket=bucket, Key="runs/r1/a/b.bin")["Body"].read() == b"123"
    (tmp_path / "v.mp4").write_bytes(b"\1" * 5000)
    store.put_file("v.mp4", tmp_path / "v.mp4")
    store.get_file("v.mp4", tmp_path / "back.mp4")
    assert (tmp_path / "back.mp4").read_bytes() == b"\1" * 5000
    store.delete("a/b.bin")
    with pytest.raises(ObjectNotFoundError, match=f"s3://{bucket}/runs/r1/a/b.bin"):
        store.get_bytes("a/b.bin")
    assert s3_env.secret_key not in repr(store)


def test_checkpoint_round_trip(s3_env: S3Endpoint, make_batch: Callable[..., ForwardBatch]) -> None:
    store = open_store(f"s3://{s3_env.create_bucket()}")
    batch = make_batch()
    ref = write_checkpoint(store, KEY, batch)
    back = read_checkpoint(open_store(ref.store_uri), ref)
    for name in ("latents", "prompt_embeds", "timesteps"):
        a, b = getattr(batch, name), getattr(back, name)
        assert a.dtype == b.dtype and a.view(torch.uint8).equal(b.view(torch.uint8)), name
    assert back.extra["scheduler_state"]["model_outputs.0"].equal(
        batch.extra["scheduler_state"]["model_outputs.0"]
    )
    assert back.extra["scheduler_state"]["lower_order_nums"] == 1
    assert back.prompt == batch.prompt and back.step_index == batch.step_index


@pytest.mark.parametrize(
    ("override", "code"),
    [
        ("AWS_SECRET_ACCESS_KEY", "SignatureDoesNotMatch"),
        ("AWS_ACCESS_KEY_ID", "InvalidAccessKeyId"),
    ],
)
def test_wrong_credentials(
    s3_env: S3Endpoint, monkeypatch: pytest.MonkeyPatch, override: str, code: str
) -> None:
    bucket = s3_env.create_bucket()
    wrong = "wrong-" + s3_env.secret_key[::-1]
    monkeypatch.setenv(override, wrong)
    with pytest.raises(StoreError) as info:
        open_store(f"s3://{bucket}/p")
    message = str(info.value)
    assert f"access denied to bucket '{bucket}' ({code})" in message
    assert "check AWS credentials" in message
    assert not isinstance(info.value, StoreUnavailableError)  # retrying cannot help
    for exc in _chain(info.value):
        for text in (str(exc), repr(exc)):
            assert s3_env.secret_key not in text and wrong not in text
    assert s3_env.client().list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


def test_missing_bucket(s3_env: S3Endpoint) -> None:
    with pytest.raises(StoreError, match="bucket 'no-such-bucket-x' does not exist"):
        open_store("s3://no-such-bucket-x/prefix")
    with pytest.raises(ValueError, match="no bucket"):
        open_store("s3:///prefix")


def test_corrupted_object_is_detected(
    s3_env: S3Endpoint, make_batch: Callable[..., ForwardBatch]
) -> None:
    bucket = s3_env.create_bucket()
    store = open_store(f"s3://{bucket}")
    ref = write_checkpoint(store, KEY, make_batch())
    client = s3_env.client()
    manifest = json.loads(
        client.get_object(Bucket=bucket, Key=f"{KEY}/manifest.json")["Body"].read()
    )
    name = f"{KEY}/{manifest['files']['tensors']['name']}"
    data = bytearray(client.get_object(Bucket=bucket, Key=name)["Body"].read())
    data[len(data) // 2] ^= 0x01
    client.put_object(Bucket=bucket, Key=name, Body=bytes(data))
    with pytest.raises(CorruptCheckpointError, match=name):
        read_checkpoint(store, ref)


def test_concurrent_writers(s3_env: S3Endpoint, make_batch: Callable[..., ForwardBatch]) -> None:
    store = open_store(f"s3://{s3_env.create_bucket()}")
    ref = write_checkpoint(store, KEY, make_batch(seed=3))
    stop = threading.Event()

    def write_loop() -> None:
        batch = make_batch(seed=3)
        while not stop.is_set():
            write_checkpoint(store, KEY, batch)

    writers = [threading.Thread(target=write_loop) for _ in range(2)]
    for w in writers:
        w.start()
    try:
        for _ in range(15):  # CorruptCheckpointError here fails the test
            retry_io(lambda: read_checkpoint(store, ref), attempts=5, backoff=0.0)
    finally:
        stop.set()
        for w in writers:
            w.join()


def test_unreachable_endpoint_is_transient_and_fast(
    s3_env: S3Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    (closed_port,) = free_ports(1)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port}")
    start = time.monotonic()
    with pytest.raises(StoreUnavailableError, match="unreachable"):
        retry_io(lambda: open_store("s3://bucket/prefix"), attempts=2, backoff=0.1)
    assert time.monotonic() - start < 15
