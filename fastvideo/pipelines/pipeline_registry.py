"""Finds pipeline classes: `EntryClass` in each package under `fastvideo/pipelines/`,
plus classes that installed packages declare in the `fastvideo.pipelines` entry-point group.

Discovery runs on first use, not at import.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from importlib.metadata import entry_points

from fastvideo.pipelines.composed_pipeline_base import ComposedPipelineBase

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "fastvideo.pipelines"
_NON_PIPELINE_PACKAGES = frozenset({"stages"})

_registry: dict[str, type[ComposedPipelineBase]] | None = None


def _entry_classes(obj: object, origin: str) -> list[type[ComposedPipelineBase]]:
    classes = obj if isinstance(obj, (list, tuple)) else [obj]
    for cls in classes:
        if not (isinstance(cls, type) and issubclass(cls, ComposedPipelineBase)):
            raise TypeError(f"EntryClass in {origin} must be ComposedPipelineBase subclasses, got {cls!r}")
    return list(classes)


def _scan_package(package_name: str) -> dict[str, type[ComposedPipelineBase]]:
    found: dict[str, type[ComposedPipelineBase]] = {}
    package = importlib.import_module(package_name)
    for info in pkgutil.walk_packages(package.__path__, prefix=f"{package_name}."):
        if info.ispkg or info.name.split(".")[2] in _NON_PIPELINE_PACKAGES:
            continue
        module = importlib.import_module(info.name)
        if hasattr(module, "EntryClass"):
            for cls in _entry_classes(module.EntryClass, info.name):
                found[cls.__name__] = cls
    return found


def _discover() -> dict[str, type[ComposedPipelineBase]]:
    registry = _scan_package("fastvideo.pipelines")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        for cls in _entry_classes(ep.load(), f"entry point {ep.name!r}"):
            if cls.__name__ in registry and registry[cls.__name__] is not cls:
                logger.warning("entry point %r replaces pipeline %s", ep.name, cls.__name__)
            registry[cls.__name__] = cls
    return registry


def register_pipeline(cls: type[ComposedPipelineBase]) -> type[ComposedPipelineBase]:
    """Register a pipeline class by hand (also usable as a decorator)."""
    _entry_classes(cls, "register_pipeline")
    pipeline_registry()[cls.__name__] = cls
    return cls


def pipeline_registry() -> dict[str, type[ComposedPipelineBase]]:
    global _registry
    if _registry is None:
        _registry = _discover()
    return _registry


def get_pipeline_class(name: str) -> type[ComposedPipelineBase]:
    """The pipeline class registered under `name` (the `_class_name` of `model_index.json`)."""
    registry = pipeline_registry()
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"unknown pipeline {name!r}; known pipelines: {sorted(registry)}") from None
