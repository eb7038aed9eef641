"""A progress checkpoint's snapshot (`snapshot_fields`): copies of the named fields, taken
when asked, encoded later on another thread to the same bytes as encoding right away."""

from __future__ import annotations

import pytest
import torch

from fastvideo.forward_batch import ForwardBatch
from fastvideo.storage.batch_codec import decode_batch, encode_batch, snapshot_fields

FIELDS = ("latents", "step_index", "extra")


def _batch() -> ForwardBatch:
    torch.manual_seed(0)
    batch = ForwardBatch(latents=torch.randn(1, 4, 3, 8, 8), step_index=5)
    batch.extra = {"scheduler_state": {"model_outputs.0": torch.randn(1, 4, 3, 8, 8),
                                       "model_outputs.__len__": 1, "lower_order_nums": 2,
                                       "sigmas": torch.linspace(1, 0, 11)},
                   "note": "kept"}
    return batch


def test_the_snapshot_encodes_as_the_batch_did_when_it_was_taken() -> None:
    batch = _batch()
    expected = encode_batch(batch, FIELDS)
    snapshot, ready = snapshot_fields(batch, FIELDS)
    # The loop goes on: it rebinds fields and may write into the tensors it had.
    batch.latents.add_(1.0)
    batch.extra["scheduler_state"]["model_outputs.0"].zero_()
    batch.extra["scheduler_state"]["lower_order_nums"] = 3
    batch.step_index = 6
    ready()
    encoded = encode_batch(snapshot, FIELDS)
    assert encoded.tensors == expected.tensors and encoded.fields == expected.fields
    restored = decode_batch(encoded)
    assert restored.step_index == 5 and restored.extra["note"] == "kept"
    assert restored.extra["scheduler_state"]["lower_order_nums"] == 2


def test_only_the_named_fields_and_unknown_names_fail() -> None:
    snapshot, _ = snapshot_fields(_batch(), ("latents",))
    assert snapshot.latents is not None and snapshot.step_index == ForwardBatch().step_index
    with pytest.raises(ValueError, match=r"unknown ForwardBatch fields \['latent'\]"):
        snapshot_fields(_batch(), ("latent",))
