"""Loads the components listed in a Diffusers-format `model_index.json`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from fastvideo.attention.layer import request_attention_backend
from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.models.compile import compile_repeated_blocks
from fastvideo.models.compile_cache import configure_compile_cache, configure_kernel_cache
from fastvideo.models.loader.transfer import to_device, weights_to_device
from fastvideo.models.loader.weight_utils import WeightFileError, find_weight_files, iterate_weights
from fastvideo.models.registry import ModelEntry, resolve_model
from fastvideo.models.schedulers.sync_free import use_sync_free_steps
from fastvideo.models.vae_speed import speed_up_vae

logger = logging.getLogger(__name__)

# Components that do math in the engine's compute dtype; the VAE has its own dtype.
_VAE_COMPONENTS = frozenset({"vae"})


def read_model_index(model_path: str | Path) -> dict[str, Any]:
    """`model_index.json` of a Diffusers-format folder, checked for shape."""
    index_path = Path(model_path) / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(
            f"{index_path} not found: model_path must be a Diffusers-format folder")
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{index_path} is not valid JSON: {e}") from None
    if "_class_name" not in index:
        raise ValueError(f"{index_path} has no '_class_name'")
    return index


def component_entries(index: dict[str, Any]) -> list[tuple[str, list[Any]]]:
    """The `(name, [library, class])` entries of a `model_index.json` that are components
    (not `_class_name`, `_diffusers_version` or an absent component)."""
    return [(name, spec) for name, spec in index.items()
            if not name.startswith("_") and isinstance(spec, list) and spec[0] is not None]


def is_our_component(spec: list[Any]) -> bool:
    """Whether a component entry names a class our own code implements (an unknown class
    is not: its load reports it)."""
    if len(spec) != 2:
        return False
    try:
        return resolve_model(spec[1], spec[0]).library == "fastvideo"
    except ValueError:
        return False


def check_model_files(model_path: str | Path) -> None:
    """Fail before any work on what would fail every item, naming the file or class: a
    component class no registry knows, a missing component folder, a safetensors file
    whose header does not parse or whose size does not match its header's offsets
    (truncated), a shard an index lists but that is missing. Cheap: it reads
    `model_index.json` and the safetensors headers, never the tensors."""
    index_path = Path(model_path) / "model_index.json"
    for name, spec in component_entries(read_model_index(model_path)):
        if len(spec) != 2:
            raise ValueError(f"{index_path}: entry {name!r} must be [library, class], "
                             f"got {spec!r}")
        try:
            resolve_model(spec[1], spec[0])
        except ValueError as e:
            raise ValueError(f"{index_path}: component {name!r}: {e}") from None
        folder = Path(model_path) / name
        if not folder.is_dir():
            raise FileNotFoundError(f"{index_path} lists component {name!r}, but {folder} "
                                    "is missing")
        if any(folder.glob("*.safetensors")) or any(folder.glob("*.safetensors.index.json")):
            for path in find_weight_files(folder):
                _check_safetensors_header(path)


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def load_component(name: str, spec: list[str] | tuple[str, str], model_path: str | Path,
                   fastvideo_args: FastVideoArgs) -> Any:
    """Load component `name` (`model_index.json` entry `spec = [library, class]`)."""
    return finish_component(name, read_component(name, spec, model_path, fastvideo_args),
                            fastvideo_args)


def read_component(name: str, spec: list[str] | tuple[str, str], model_path: str | Path,
                   fastvideo_args: FastVideoArgs) -> Any:
    """The first part of `load_component`: the module built with its weights on the device,
    nothing imported but its class (so a thread may do it while another imports).
    `finish_component` does the rest."""
    if not (isinstance(spec, (list, tuple)) and len(spec) == 2):
        raise ValueError(f"model_index.json entry {name!r} must be [library, class], got {spec!r}")
    library, class_name = spec
    folder = Path(model_path) / name
    if not folder.is_dir():
        raise FileNotFoundError(f"component folder for {name!r} not found: {folder}")
    entry = resolve_model(class_name, library)
    dtype = (fastvideo_args.torch_vae_dtype if name in _VAE_COMPONENTS
             else fastvideo_args.torch_dtype)
    logger.info("loading %s (%s) from %s", name, class_name, folder)
    if entry.library == "fastvideo":
        if fastvideo_args.compile_cache_dir is not None:
            # Before any attention layer imports FlashAttention's CuTe kernels, whose JIT
            # compiles run compiled or not (idempotent: once per process).
            configure_kernel_cache(fastvideo_args.compile_cache_dir)
        return _load_fastvideo_model(entry, folder, fastvideo_args.device, dtype)
    return _load_library_component(entry, folder, fastvideo_args.device, dtype)


def finish_component(name: str, component: Any, fastvideo_args: FastVideoArgs) -> Any:
    """The second part of `load_component`: attention backends and compiling for our
    models, the VAE's speed-ups (these import the kernels and the compiler)."""
    if isinstance(component, nn.Module) and type(component).__module__.startswith("fastvideo."):
        if fastvideo_args.attention_backend is not None:
            request_attention_backend(component, fastvideo_args.attention_backend)
        if fastvideo_args.enable_torch_compile and name == "transformer":
            if fastvideo_args.compile_cache_dir is not None:
                # Before the first compile: the caches' folder is read when they are used.
                configure_compile_cache(fastvideo_args.compile_cache_dir)
            compile_repeated_blocks(component, dtype=fastvideo_args.torch_dtype)
        return component
    if name in _VAE_COMPONENTS:
        # Not compiled: a warm worker decodes on one thread beside the compiled DiT on
        # another, and a compile trace on one breaks compiled calls on the other.
        # Channels-last is slower on the CPU; the lean ops are faster everywhere.
        speed_up_vae(component, channels_last=fastvideo_args.device.startswith("cuda"),
                     compile_blocks=False)
    use_sync_free_steps(component)  # UniPC: the same steps without a host sync each
    return component


def _load_fastvideo_model(entry: ModelEntry, folder: Path, device: str,
                          dtype: torch.dtype) -> nn.Module:
    config = read_json(folder / "config.json")
    cls = entry.load_class()
    files = find_weight_files(folder)
    with torch.device(device):
        model = cls.from_config(config)
    missing, unexpected = model.load_weights(weights_to_device(iterate_weights(files), device))
    if missing:
        raise ValueError(
            f"{folder}: {len(missing)} parameters of {entry.class_name} are missing from the "
            f"checkpoint, e.g. {sorted(missing)[:5]}")
    if unexpected:
        logger.warning("%s: ignoring %d checkpoint tensors %s has no parameter for, e.g. %s",
                       folder, len(unexpected), entry.class_name, sorted(unexpected)[:5])
    model.to_compute_dtype(dtype) if hasattr(model, "to_compute_dtype") else model.to(dtype)
    return model.eval().requires_grad_(False)


def _load_library_component(entry: ModelEntry, folder: Path, device: str,
                            dtype: torch.dtype) -> Any:
    cls = entry.load_class()
    if not issubclass(cls, nn.Module):  # tokenizers, processors, schedulers: no weights
        return cls.from_pretrained(folder)
    # Fail on bad weight files with our message (naming the file) before the library tries.
    for path in find_weight_files(folder):
        if path.suffix == ".safetensors":
            _check_safetensors_header(path)
    try:
        model = cls.from_pretrained(folder, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise WeightFileError(f"cannot load {entry.class_name} from {folder}: {e}") from e
    return to_device(model, device).eval().requires_grad_(False)  # threads on CUDA


def _check_safetensors_header(path: Path) -> None:
    # Opening parses the header and checks it against the file size (catches truncation)
    # without reading the tensors.
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as e:
        raise WeightFileError(f"cannot read safetensors file {path}: {e}") from None
