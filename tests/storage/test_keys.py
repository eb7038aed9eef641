"""Deterministic checkpoint keys and model fingerprints."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from fastvideo.storage import checkpoint_key, model_fingerprint
from fastvideo.storage.file_digests import CACHE_DIR_ENV, cache_path

BASE: dict[str, Any] = {
    "model_fingerprint": "f" * 64,
    "stage": "encode_text",
    "params": {"prompt": ["a fox"], "max_sequence_length": 512, "dtype": "bf16"},
    "input_digest": None,
}


def test_key_is_deterministic_and_shaped() -> None:
    key = checkpoint_key(**BASE)
    reordered = dict(BASE, params=dict(reversed(list(BASE["params"].items()))))
    assert key == checkpoint_key(**BASE) == checkpoint_key(**reordered)
    stage, digest = key.split("/")[1:]
    assert key.startswith("checkpoints/") and stage == "encode_text" and len(digest) == 64


@pytest.mark.parametrize(
    "change",
    [
        {"model_fingerprint": "e" * 64},
        {"stage": "encode_text2"},
        {"params": {**BASE["params"], "max_sequence_length": 256}},
        {"params": {**BASE["params"], "extra_flag": True}},
        {"input_digest": "0" * 64},
    ],
)
def test_key_changes_with_each_input(change: dict[str, Any]) -> None:
    assert checkpoint_key(**{**BASE, **change}) != checkpoint_key(**BASE)


def test_key_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="stage name"):
        checkpoint_key(**{**BASE, "stage": "../x"})
    with pytest.raises(ValueError, match="JSON-serialisable"):
        checkpoint_key(**{**BASE, "params": {"x": object()}})
    with pytest.raises(ValueError, match="JSON-serialisable"):
        checkpoint_key(**{**BASE, "params": {"x": float("nan")}})


def _tiny_model(root: Path) -> Path:
    root.mkdir()
    index = {
        "_class_name": "WanPipeline",
        "_diffusers_version": "0.33.0",
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
        "transformer_2": [None, None],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    for component in ("transformer", "vae"):
        (root / component).mkdir()
        (root / component / "config.json").write_text(json.dumps({"num_layers": 2}))
        (root / component / "diffusion_pytorch_model.safetensors").write_bytes(b"w" * 100)
    return root


def test_model_fingerprint(tmp_path: Path) -> None:
    model = _tiny_model(tmp_path / "model")
    fingerprint = model_fingerprint(model)
    assert fingerprint == model_fingerprint(str(model)) and len(fingerprint) == 64

    (model / ".cache").mkdir()
    (model / ".cache" / "download.lock").write_text("x")
    assert model_fingerprint(model) == fingerprint  # download caches do not count

    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    stat = weights.stat()
    weights.write_bytes(b"v" * 100)  # other weights of the same size, mtime kept (cp -p)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert model_fingerprint(model) != fingerprint  # the weights' content counts
    weights.write_bytes(b"w" * 100)
    assert model_fingerprint(model) == fingerprint

    (model / "transformer" / "config.json").write_text(json.dumps({"num_layers": 3}))
    assert model_fingerprint(model) != fingerprint


def test_weight_digests_are_remembered_outside_the_model(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    model = _tiny_model(tmp_path / "model")
    files = sorted(model.rglob("*"))
    fingerprint = model_fingerprint(model)
    assert not cache_path().exists()  # files written in the last 2 s are not remembered
    time.sleep(2.1)
    assert model_fingerprint(model) == fingerprint
    entries = json.loads(cache_path().read_text())
    weights = [model / c / "diffusion_pytorch_model.safetensors" for c in ("transformer", "vae")]
    assert sorted(entries) == sorted(str(w.resolve()) for w in weights)
    assert {e["sha256"] for e in entries.values()} == {hashlib.sha256(b"w" * 100).hexdigest()}
    # A remembered digest is used while the file is unchanged (size, mtime, ctime, inode),
    # not after a write.
    cache_path().write_text(json.dumps({k: {**e, "sha256": "0" * 64} for k, e in entries.items()}))
    assert model_fingerprint(model) != fingerprint
    for path in weights:
        path.write_bytes(b"w" * 100)
    assert model_fingerprint(model) == fingerprint
    assert sorted(model.rglob("*")) == files  # the model folder (maybe read-only) is only read
    # Without a writable cache folder, the weights are hashed every time, to the same end.
    monkeypatch.setenv(CACHE_DIR_ENV, str(weights[0]))
    assert model_fingerprint(model) == fingerprint


def test_model_fingerprint_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no model_index.json"):
        model_fingerprint(tmp_path)
    model = _tiny_model(tmp_path / "model")
    shutil.rmtree(model / "vae")
    with pytest.raises(ValueError, match="component 'vae'"):
        model_fingerprint(model)
