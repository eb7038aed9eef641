"""Deterministic checkpoint keys: the same work maps to the same key, other work never does."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from fastvideo.storage.file_digests import cached_sha256s, file_sha256
from fastvideo.storage.schema import SCHEMA_VERSION

_STAGE_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")
# Weights are gigabytes: their digests are remembered per file version (`file_digests`).
_WEIGHT_SUFFIXES = frozenset(
    {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5", ".onnx"}
)


def checkpoint_key(
    *,
    model_fingerprint: str,
    stage: str,
    params: dict[str, Any],
    input_digest: str | None,
) -> str:
    """`checkpoints/<stage>/<sha256>` of everything that determines the stage's output.

    `params` must be JSON-serialisable (the stage's parameters: sizes, seed, step
    range, ...); `input_digest` is the input checkpoint's digest, None for a first
    stage. The checkpoint schema version is hashed too, so a format change never
    finds checkpoints it cannot read.
    """
    if not _STAGE_NAME.fullmatch(stage):
        raise ValueError(f"stage name {stage!r} must match {_STAGE_NAME.pattern}")
    payload = {
        "schema_version": SCHEMA_VERSION,
        "model_fingerprint": model_fingerprint,
        "stage": stage,
        "params": params,
        "input_digest": input_digest,
    }
    try:
        canonical = json.dumps(
            payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint_key params must be JSON-serialisable: {exc}") from exc
    return f"checkpoints/{stage}/{hashlib.sha256(canonical.encode()).hexdigest()}"


def model_fingerprint(model_path: str | Path) -> str:
    """sha256 over a Diffusers folder's contents: `model_index.json`, and each component's
    files (configs, tokenizer files, weights) by relative path and sha256. It follows the
    weights' content, not their names and sizes; their digests are computed once per
    version of a file and remembered outside the folder (`fastvideo.storage.file_digests`),
    so a run costs a stat per file."""
    root = Path(model_path)
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise ValueError(f"{root} is not a Diffusers model folder: no model_index.json")
    index = json.loads(index_path.read_text())
    digest = hashlib.sha256()
    digest.update(b"model_index.json\0" + index_path.read_bytes())
    # Components are the entries shaped [library, class]; a null one is absent.
    components = sorted(
        name for name, value in index.items() if isinstance(value, list) and value[0] is not None
    )
    for component in components:
        folder = root / component
        if not folder.is_dir():
            raise ValueError(
                f"model_index.json lists component {component!r}, but {folder} is missing"
            )
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not _hidden(p, root))
        weights = [p for p in files if p.suffix in _WEIGHT_SUFFIXES]
        contents = dict(zip(weights, cached_sha256s(weights)))
        for path in files:
            rel = path.relative_to(root).as_posix()
            content = contents[path] if path in contents else file_sha256(path)
            digest.update(f"{rel}\0sha256={content}\0".encode())
    return digest.hexdigest()


def _hidden(path: Path, root: Path) -> bool:
    # Download caches (.cache/, .gitattributes) do not change the model.
    return any(part.startswith(".") for part in path.relative_to(root).parts)

