"""Building a pipeline from a Diffusers-format folder: the class `model_index.json` (or the
engine's `pipeline_name`) names, with all its modules or only those some stages use."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.models.loader.component_loader import read_model_index
from fastvideo.pipelines.composed_pipeline_base import ComposedPipelineBase
from fastvideo.pipelines.phases import Phase
from fastvideo.pipelines.pipeline_registry import get_pipeline_class


def check_device_available(device: str) -> None:
    """Fail before loading anything when a CUDA device is asked for on a machine without one."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but this machine has no usable CUDA "
                         "GPU (torch.cuda.is_available() is False); use device='cpu'")


def pipeline_class(model_path: str, pipeline_name: str | None = None
                   ) -> type[ComposedPipelineBase]:
    """The pipeline class for a model folder: `pipeline_name`, else the `_class_name` of its
    `model_index.json` (read once per process, nothing loaded)."""
    return get_pipeline_class(pipeline_name or _pipeline_name(model_path))


@functools.lru_cache(maxsize=64)
def _pipeline_name(model_path: str) -> str:
    return read_model_index(model_path)["_class_name"]


def model_phases(model_path: str, pipeline_name: str | None = None) -> tuple[Phase, ...]:
    """The phases of the model's pipeline (see `fastvideo.pipelines.phases`)."""
    cls = pipeline_class(model_path, pipeline_name)
    if not cls.phases:
        raise ValueError(f"pipeline {cls.__name__} declares no phases, so it cannot run as "
                         "batch work; declare `phases` on the class")
    return cls.phases


def build_pipeline(fastvideo_args: FastVideoArgs, modules: dict[str, Any] | None = None,
                   required_modules: Iterable[str] | None = None) -> ComposedPipelineBase:
    """Instantiate the pipeline named by the args or by `model_index.json`.

    `required_modules` (default: all) are the modules to load; see `ComposedPipelineBase`.
    """
    check_device_available(fastvideo_args.device)
    cls = pipeline_class(fastvideo_args.model_path, fastvideo_args.pipeline_name)
    return cls(fastvideo_args.model_path, fastvideo_args, modules=modules,
               required_modules=required_modules)


def build_pipeline_for_stages(fastvideo_args: FastVideoArgs, stage_names: Iterable[str],
                              modules: dict[str, Any] | None = None) -> ComposedPipelineBase:
    """A pipeline that loads only the modules the named stages use (of `modules`, the
    already loaded ones, it takes those).

    Which modules those are, a first build without any (model configs only, milliseconds)
    tells, so this works for any pipeline's stages.
    """
    needed = build_pipeline(fastvideo_args, required_modules=()).stage_modules(stage_names)
    given = {name: module for name, module in (modules or {}).items() if name in needed}
    return build_pipeline(fastvideo_args, modules=given, required_modules=needed)
