"""Reading weight files: safetensors (single or sharded); pickles only with weights_only.
Copying checkpoint tensors into a model's parameters."""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

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


def prefetch_model_files(model_path: str | Path) -> int:
    """Ask the OS to start reading the weight files of every component folder of a
    Diffusers-format model into its page cache (`posix_fadvise(WILLNEED)`: it returns at
    once, the disk works in the background); returns the bytes asked for. A fresh warm
    worker calls it before its CUDA start and the pipeline's imports, so on a cold disk the
    seconds those take also read the weights. Folders and files it cannot read are left
    for the load to report; 0 where the OS has no such call."""
    advise = getattr(os, "posix_fadvise", None)
    root = Path(model_path)
    if advise is None or not root.is_dir():
        return 0
    total = 0
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            files = find_weight_files(folder)
        except (WeightFileError, OSError):
            continue  # tokenizers, schedulers: no weights
        for path in files:
            try:
                with open(path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    advise(f.fileno(), 0, size, os.POSIX_FADV_WILLNEED)
            except OSError:
                continue
            total += size
    return total


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


NameMap = Callable[[str], tuple[str, int | str | None]]
"""A checkpoint name -> (our parameter name, shard id for a fused parameter's
`weight_loader`, or None)."""


def regex_name_map(renames: dict[str, tuple[str, str | None]]) -> NameMap:
    """A `NameMap` from `pattern -> (replacement, shard)`; the first pattern that matches
    wins, a name none matches is kept. `shard` (a template like the replacement, e.g.
    r"\3" or "0") gives the shard id of a fused parameter: "q", "k", "v", or an index."""
    compiled = [(re.compile(pattern), target) for pattern, target in renames.items()]

    def map_name(name: str) -> tuple[str, int | str | None]:
        for pattern, (replacement, shard) in compiled:
            match = pattern.search(name)
            if match is None:
                continue
            mapped = pattern.sub(replacement, name, count=1)
            if shard is None:
                return mapped, None
            shard_id = match.expand(shard)
            return mapped, int(shard_id) if shard_id.isdigit() else shard_id
        return name, None

    return map_name


def load_renamed_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                         names: dict[str, str] | NameMap,
                         ignored: re.Pattern[str] | None = None) -> tuple[set[str], set[str]]:
    """Copy checkpoint tensors into `model`'s parameters, through each parameter's
    `weight_loader` (which slices its rank's shard) where it has one.

    `names`: checkpoint name regex -> parameter name (first match wins; unmatched names are
    kept), or a `NameMap`, which may also give a shard id for fused parameters (q/k/v,
    gate/up). `ignored`: checkpoint names to skip silently. Returns (missing parameter
    names, unexpected checkpoint names); a fused parameter counts as loaded once any of its
    parts is. A shape mismatch raises ValueError naming the tensor.
    """
    map_name = names if callable(names) else lambda name: (map_checkpoint_name(name, names),
                                                           None)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    unexpected: set[str] = set()
    for ckpt_name, tensor in weights:
        if ignored is not None and ignored.search(ckpt_name):
            continue
        name, shard_id = map_name(ckpt_name)
        param = params.get(name)
        if param is None:
            unexpected.add(ckpt_name)
            continue
        with torch.no_grad():
            weight_loader = getattr(param, "weight_loader", None)
            try:
                if shard_id is not None:
                    weight_loader(param, tensor, shard_id)
                elif weight_loader is not None:
                    weight_loader(param, tensor)
                elif param.shape != tensor.shape:
                    raise ValueError(f"shape mismatch: parameter {tuple(param.shape)}, "
                                     f"checkpoint {tuple(tensor.shape)}")
                else:
                    param.copy_(tensor)
            except ValueError as e:
                raise ValueError(f"{ckpt_name}: {e}") from None
        loaded.add(name)
    return set(params) - loaded, unexpected


def map_checkpoint_name(name: str, names_mapping: dict[str, str]) -> str:
    """The parameter name of checkpoint tensor `name` under `names_mapping` (see
    `load_renamed_weights`)."""
    for pattern, replacement in names_mapping.items():
        mapped, count = re.subn(pattern, replacement, name)
        if count:
            return mapped
    return name
