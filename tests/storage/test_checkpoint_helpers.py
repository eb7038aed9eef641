"""The checkpoint helpers tasks and the denoise worker share: reuse, merge, delete."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch

from fastvideo.forward_batch import ForwardBatch
from fastvideo.storage import (
    CorruptInputError,
    LocalStore,
    delete_checkpoint,
    find_checkpoint,
    load_valid_checkpoint,
    read_inputs,
    write_checkpoint,
)

KEY = "checkpoints/test/abc"
MakeBatch = Callable[..., ForwardBatch]


def _flip_a_byte(store: LocalStore, key: str) -> None:
    name = next(k for k in store.list(f"{key}/") if k.endswith(".safetensors"))
    data = bytearray(store.get_bytes(name))
    data[-1] ^= 0xFF
    store.put_bytes(name, bytes(data))


def test_load_valid_checkpoint(local_store: LocalStore, make_batch: MakeBatch,
                               caplog: pytest.LogCaptureFixture) -> None:
    assert load_valid_checkpoint(local_store, KEY) is None  # absent
    ref = write_checkpoint(local_store, KEY, make_batch(), ("prompt", "latents"))
    found = load_valid_checkpoint(local_store, KEY)
    assert found is not None and found[0] == ref
    assert found[1].prompt == make_batch().prompt

    _flip_a_byte(local_store, KEY)
    with caplog.at_level(logging.WARNING):
        assert load_valid_checkpoint(local_store, KEY) is None  # corrupt: recompute it
    assert "ignoring checkpoint" in caplog.text and KEY in caplog.text


def test_read_inputs_merges_in_order_and_names_a_bad_input(local_store: LocalStore,
                                                           make_batch: MakeBatch) -> None:
    first = write_checkpoint(local_store, "checkpoints/a/1", make_batch(seed=1),
                             ("prompt", "seed", "latents"))
    second = write_checkpoint(local_store, "checkpoints/b/2", make_batch(seed=2),
                              ("seed", "prompt_embeds"))
    batch = read_inputs(local_store, [first, second])
    assert batch.seed == 2  # the later checkpoint overwrites the fields it holds
    # Bit-exact; equal_nan because the test batch carries NaN among its latents.
    assert torch.allclose(batch.latents, make_batch(seed=1).latents, rtol=0, atol=0,
                          equal_nan=True)
    assert torch.equal(batch.prompt_embeds, make_batch(seed=2).prompt_embeds)

    _flip_a_byte(local_store, second.key)
    with pytest.raises(CorruptInputError) as info:
        read_inputs(local_store, [first, second])
    assert info.value.key == second.key
    delete_checkpoint(local_store, first.key)
    with pytest.raises(CorruptInputError, match=first.key):
        read_inputs(local_store, [first])


class _RecordingStore(LocalStore):
    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.deleted: list[str] = []

    def delete(self, key: str) -> None:
        self.deleted.append(key)
        super().delete(key)


def test_delete_checkpoint_removes_the_manifest_first(tmp_path, make_batch: MakeBatch) -> None:
    store = _RecordingStore(str(tmp_path / "store"))
    write_checkpoint(store, KEY, make_batch())
    write_checkpoint(store, "checkpoints/test/abcd", make_batch())  # shares KEY's prefix
    delete_checkpoint(store, KEY)
    assert store.deleted[0] == f"{KEY}/manifest.json" and len(store.deleted) == 3
    assert store.list(f"{KEY}/") == [] and find_checkpoint(store, KEY) is None
    assert find_checkpoint(store, "checkpoints/test/abcd") is not None
    delete_checkpoint(store, KEY)  # deleting what is gone is not an error


def test_request_field_names_are_the_request() -> None:
    names = ForwardBatch.request_field_names()
    assert set(names) <= set(ForwardBatch.field_names())
    assert "prompt" in names and "seed" in names
    assert not {"latents", "prompt_embeds", "timesteps", "extra"} & set(names)
