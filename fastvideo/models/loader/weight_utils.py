"""Reading weight files: safetensors (single or sharded); pickles only with weights_only."""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class WeightFileError(ValueError):
    """A weight file is missing, unreadable or unsafe; the message names the file."""


def find_weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a component folder, in a stable order.

    A `*.safetensors.index.json` (sharded checkpoint) lists the shards; otherwise every
    `*.safetensors` in the folder is taken. Pickle checkpoints are accepted only when no
    safetensors exist (and are then read with `weights_only=True`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightFileError(f"component folder not found: {folder}")
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        return _shards_from_index(indexes[0])
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        return pickles
    raise WeightFileError(f"no weight files (*.safetensors) in {folder}")


def _shards_from_index(index_path: Path) -> list[Path]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
        raise WeightFileError(f"malformed shard index {index_path}: {e}") from None
    shards = [index_path.parent / name for name in sorted(set(weight_map.values()))]
    for shard in shards:
        if not shard.is_file():
            raise WeightFileError(f"shard {shard} listed in {index_path} does not exist")
    return shards


def iterate_weights(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name, tensor)` for every tensor of every file, one file open at a time."""
    for path in files:
        if path.suffix in _PICKLE_SUFFIXES:
            yield from _load_pickle_weights(path).items()
            continue
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise WeightFileError(f"cannot read safetensors file {path}: {e}") from None


def _load_pickle_weights(path: Path) -> dict[str, torch.Tensor]:
    # weights_only=True refuses pickles that carry code; plain tensors still load.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise WeightFileError(
            f"refusing to load {path}: it is not a plain tensor checkpoint "
            f"(torch.load with weights_only=True rejected it: {str(e).splitlines()[0]}). "
            f"Convert it to safetensors.") from None
    except (RuntimeError, OSError, EOFError) as e:
        raise WeightFileError(f"cannot read weight file {path}: {e}") from None
    if not isinstance(state, dict):
        raise WeightFileError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return state
