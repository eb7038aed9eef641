"""`ComposedPipelineBase`: a pipeline is its modules plus an ordered list of stages."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any

import torch

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.models.loader.component_loader import load_component, read_model_index
from fastvideo.pipelines.pipeline_batch_info import ForwardBatch
from fastvideo.pipelines.stages.base import PipelineStage

logger = logging.getLogger(__name__)


class ComposedPipelineBase(ABC):
    """Loads the modules named in `_required_config_modules`, then runs its stages in order.

    Subclasses declare `_required_config_modules` (names of `model_index.json` entries),
    build their stages in `create_pipeline_stages` with `add_stage`, and may prepare
    anything else in `initialize_pipeline`. `modules` lets a caller pass already-loaded
    components (e.g. to share a text encoder between pipelines, or in tests).
    """

    _required_config_modules: list[str] = []

    def __init__(self, model_path: str, fastvideo_args: FastVideoArgs,
                 modules: dict[str, Any] | None = None) -> None:
        self.model_path = model_path
        self.fastvideo_args = fastvideo_args
        self.model_index = read_model_index(model_path)
        self.modules: dict[str, Any] = dict(modules or {})
        self._stages: dict[str, PipelineStage] = {}
        self.load_modules()
        self.initialize_pipeline(fastvideo_args)
        self.create_pipeline_stages(fastvideo_args)

    @property
    def required_config_modules(self) -> list[str]:
        return list(self._required_config_modules)

    def load_modules(self) -> None:
        missing = [m for m in self.required_config_modules
                   if m not in self.modules and m not in self.model_index]
        if missing:
            raise ValueError(
                f"{type(self).__name__} needs components {missing}, which "
                f"{self.model_path}/model_index.json does not list "
                f"(it lists {sorted(k for k in self.model_index if not k.startswith('_'))})")
        for name in self.required_config_modules:
            if name not in self.modules:
                self.modules[name] = load_component(
                    name, self.model_index[name], self.model_path, self.fastvideo_args)

    def get_module(self, name: str) -> Any:
        try:
            return self.modules[name]
        except KeyError:
            raise ValueError(
                f"{type(self).__name__} has no module {name!r}; loaded: {sorted(self.modules)}"
            ) from None

    def add_stage(self, stage_name: str, stage: PipelineStage) -> None:
        if stage_name in self._stages:
            raise ValueError(f"{type(self).__name__} already has a stage named {stage_name!r}")
        stage.stage_name = stage_name
        self._stages[stage_name] = stage

    @property
    def stages(self) -> dict[str, PipelineStage]:
        """The stages by name, in the order they run."""
        return dict(self._stages)

    def get_stage(self, stage_name: str) -> PipelineStage:
        try:
            return self._stages[stage_name]
        except KeyError:
            raise ValueError(
                f"{type(self).__name__} has no stage {stage_name!r}; stages: {list(self._stages)}"
            ) from None

    def initialize_pipeline(self, fastvideo_args: FastVideoArgs) -> None:  # noqa: B027
        """Hook for set-up beyond loading modules; nothing by default."""

    @abstractmethod
    def create_pipeline_stages(self, fastvideo_args: FastVideoArgs) -> None:
        """Build the stages with `add_stage`, injecting modules through `get_module`."""

    @torch.no_grad()
    def forward(self, batch: ForwardBatch, fastvideo_args: FastVideoArgs | None = None
                ) -> ForwardBatch:
        """Run every stage in order; `batch.timings` gets each stage's seconds."""
        args = fastvideo_args or self.fastvideo_args
        for name, stage in self._stages.items():
            logger.debug("running stage %s", name)
            batch = stage(batch, args)
        return batch
