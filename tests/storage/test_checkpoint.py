"""ForwardBatch checkpoints: bit-exact round trips, digests, corruption, absence."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable

import pytest
import torch

from fastvideo.forward_batch import ForwardBatch
from fastvideo.storage import (
    CheckpointNotFoundError,
    CheckpointRef,
    CorruptCheckpointError,
    LocalStore,
    find_checkpoint,
    read_checkpoint,
    write_checkpoint,
)

KEY = "checkpoints/test/abc"
MakeBatch = Callable[..., ForwardBatch]


def assert_bit_equal(a: object, b: object, where: str = "batch") -> None:
    """Tensors equal bit for bit (dtype, shape, every bit); everything else by ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        bits_a, bits_b = (t.contiguous().view(torch.uint8) for t in (a, b))
        assert torch.equal(bits_a, bits_b), where  # bits, not values (NaN, -0.0)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_bit_equal(a[k], b[k], f"{where}[{k!r}]")
    else:
        assert a == b and type(a) is type(b), f"{where}: {a!r} != {b!r}"


def assert_batches_equal(a: ForwardBatch, b: ForwardBatch) -> None:
    for name in ForwardBatch.field_names():
        assert_bit_equal(getattr(a, name), getattr(b, name), name)


def test_round_trip_is_bit_exact(local_store: LocalStore, make_batch: MakeBatch) -> None:
    batch = make_batch()
    ref = write_checkpoint(local_store, KEY, batch)
    assert ref == CheckpointRef(local_store.root_uri, KEY, ref.digest)
    assert json.loads(json.dumps(ref.__dict__)) == ref.__dict__  # plain strings
    assert pickle.loads(pickle.dumps(ref)) == ref
    back = read_checkpoint(local_store, ref)
    assert_batches_equal(batch, back)
    assert back.prompt_embeds is not None and back.prompt_embeds.dtype == torch.bfloat16
    assert back.negative_prompt is None and back.output is None
    assert len(local_store.list(KEY)) == 3  # tensors, fields, manifest


def test_layout_and_manifest(local_store: LocalStore, make_batch: MakeBatch) -> None:
    ref = write_checkpoint(local_store, KEY, make_batch())
    manifest = json.loads(local_store.get_bytes(f"{KEY}/manifest.json"))
    assert manifest["schema_version"] == 1 and manifest["digest"] == ref.digest
    import pyarrow.parquet as pq
    from safetensors import safe_open

    tensors_file = local_store.root / KEY / manifest["files"]["tensors"]["name"]
    with safe_open(tensors_file, framework="pt") as f:
        assert sorted(f.keys()) == [
            "extra/noise",
            "extra/scheduler_state/model_outputs.0",
            "latents",
            "prompt_embeds",
            "timesteps",
        ]
    table = pq.read_table(local_store.root / KEY / manifest["files"]["fields"]["name"])
    assert table.num_rows == 1
    assert table.column("schema_version").to_pylist() == [1]
    assert table.column("height").to_pylist() == [64]  # native column, not JSON
    assert json.loads(table.column("timings")[0].as_py()) == {"text_encoding": 0.25}


def test_equal_batches_have_equal_digests(local_store: LocalStore, make_batch: MakeBatch) -> None:
    first = write_checkpoint(local_store, KEY, make_batch(seed=1))
    second = write_checkpoint(local_store, "checkpoints/test/other", make_batch(seed=1))
    third = write_checkpoint(local_store, "checkpoints/test/third", make_batch(seed=2))
    assert first.digest == second.digest != third.digest


def test_selected_fields_and_into(local_store: LocalStore, make_batch: MakeBatch) -> None:
    batch = make_batch()
    write_checkpoint(local_store, KEY, batch, fields=["latents", "step_index", "extra"])
    back = read_checkpoint(local_store, KEY)
    assert_bit_equal(batch.latents, back.latents)
    assert back.step_index == 3 and back.prompt is None and back.height == 480  # defaults
    target = ForwardBatch(prompt=["kept"], step_index=0)
    assert read_checkpoint(local_store, KEY, into=target) is target
    assert target.prompt == ["kept"] and target.step_index == 3
    assert_bit_equal(batch.extra, target.extra)
    with pytest.raises(ValueError, match="unknown ForwardBatch fields.*'nope'.*known: prompt"):
        write_checkpoint(local_store, KEY, batch, fields=["nope"])


def test_shared_and_strided_tensors(local_store: LocalStore) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    batch = ForwardBatch(latents=base[:, ::2], output=base[1:3], extra={"same": base})
    back = read_checkpoint(local_store, write_checkpoint(local_store, KEY, batch))
    assert_batches_equal(batch, back)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"x": object()}, "not JSON-serialisable"),
        ({"x": (1, 2)}, "changes through JSON"),
        ({"x": {"deep": {"t": torch.zeros(1)}}}, "not JSON-serialisable"),
        ({"a/b": torch.zeros(1)}, "without '/'"),
    ],
)
def test_unsupported_extra_values(local_store: LocalStore, extra: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_checkpoint(local_store, KEY, ForwardBatch(extra=extra))
    assert local_store.list() == []  # nothing written before validation


def test_nothing_is_unpickled(
    local_store: LocalStore, make_batch: MakeBatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = write_checkpoint(local_store, KEY, make_batch())

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a checkpoint read must not unpickle")

    for target in ("pickle.load", "pickle.loads", "torch.load"):
        monkeypatch.setattr(target, forbidden)
    read_checkpoint(local_store, ref)


@pytest.mark.parametrize("role", ["tensors", "fields", "manifest"])
def test_flipped_byte_is_detected(
    local_store: LocalStore, make_batch: MakeBatch, role: str
) -> None:
    ref = write_checkpoint(local_store, KEY, make_batch())
    manifest = json.loads(local_store.get_bytes(f"{KEY}/manifest.json"))
    name = "manifest.json" if role == "manifest" else manifest["files"][role]["name"]
    path = local_store.root / KEY / name
    data = bytearray(path.read_bytes())
    # Inside the manifest, hit a digit of a recorded size or digest, keeping it valid JSON.
    offset = data.index(b'"size": ') + 8 if role == "manifest" else len(data) // 2
    data[offset] = ord("9") if data[offset] != ord("9") else ord("8")
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=KEY):
        read_checkpoint(local_store, ref)
    with pytest.raises(CorruptCheckpointError):
        read_checkpoint(local_store, KEY)


def test_missing_data_file_is_corrupt(local_store: LocalStore, make_batch: MakeBatch) -> None:
    write_checkpoint(local_store, KEY, make_batch())
    name = json.loads(local_store.get_bytes(f"{KEY}/manifest.json"))["files"]["fields"]["name"]
    local_store.delete(f"{KEY}/{name}")
    with pytest.raises(CorruptCheckpointError, match="incomplete"):
        read_checkpoint(local_store, KEY)


def test_missing_manifest_means_absent(local_store: LocalStore, make_batch: MakeBatch) -> None:
    assert find_checkpoint(local_store, KEY) is None
    ref = write_checkpoint(local_store, KEY, make_batch())
    assert find_checkpoint(local_store, KEY) == ref
    local_store.delete(f"{KEY}/manifest.json")  # as if the writer died before finishing
    assert find_checkpoint(local_store, KEY) is None
    with pytest.raises(CheckpointNotFoundError, match=KEY):
        read_checkpoint(local_store, ref)


def test_rewrite_replaces_and_cleans_up(local_store: LocalStore, make_batch: MakeBatch) -> None:
    old = write_checkpoint(local_store, KEY, make_batch(seed=1))
    new = write_checkpoint(local_store, KEY, make_batch(seed=2))
    assert len(local_store.list(KEY)) == 3  # the replaced data files are gone
    assert_batches_equal(read_checkpoint(local_store, new), make_batch(seed=2))
    with pytest.raises(CorruptCheckpointError, match="reference expects"):
        read_checkpoint(local_store, old)  # a reference pins the content it was made for
