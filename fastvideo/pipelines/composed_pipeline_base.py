"""`ComposedPipelineBase`: a pipeline is its modules plus an ordered list of stages."""

from __future__ import annotations

import inspect
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from fastvideo.fastvideo_args import FastVideoArgs, SamplingParam
from fastvideo.forward_batch import ForwardBatch
from fastvideo.models.loader.component_loader import load_component, read_json, read_model_index
from fastvideo.models.registry import resolve_model
from fastvideo.pipelines.phases import Phase, check_phases
from fastvideo.pipelines.stages.base import PipelineStage

logger = logging.getLogger(__name__)


class ModuleNotLoadedError(RuntimeError):
    """A stage used a module that this process did not load (see `required_modules`)."""


class UnloadedModule:
    """Stands in for a component that `required_modules` left out of this process.

    Its `config` (the component's `config.json` over its class's defaults, no weights) is
    there, so a pipeline can still derive shapes from it; anything else raises
    `ModuleNotLoadedError` naming the module, so a stage that needs it fails when used.
    """

    def __init__(self, name: str, spec: list[str], folder: Path, loaded: list[str]) -> None:
        self._name, self._spec, self._folder, self._loaded = name, spec, folder, loaded

    @property
    def config(self) -> dict[str, Any]:
        path = self._folder / "config.json"
        if not path.is_file():
            raise self._error("config")
        cls = resolve_model(self._spec[1], self._spec[0]).load_class()
        defaults = {p.name: p.default for p in inspect.signature(cls.__init__).parameters.values()
                    if p.default is not inspect.Parameter.empty}
        return _AttrDict({**defaults, **read_json(path)})

    def _error(self, what: str) -> ModuleNotLoadedError:
        return ModuleNotLoadedError(
            f"module {self._name!r} is not loaded in this process (loaded: {self._loaded}), "
            f"so its {what} is unavailable; build the pipeline with required_modules "
            f"including {self._name!r} to run the stages that use it")

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):  # copy, pickle and friends probe for these
            raise AttributeError(attr)
        raise self._error(f"attribute {attr!r}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise self._error("forward")

    def __repr__(self) -> str:
        return f"UnloadedModule({self._name!r})"


class _AttrDict(dict):
    """A config read as `config["key"]` or `config.key`, like the loaded modules' configs."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


class ComposedPipelineBase(ABC):
    """Loads the modules named in `_required_config_modules`, then runs its stages in order.

    Subclasses declare `_required_config_modules` (names of `model_index.json` entries),
    build their stages in `create_pipeline_stages` with `add_stage`, and may prepare
    anything else in `initialize_pipeline`. `modules` lets a caller pass already-loaded
    components (e.g. to share a text encoder between pipelines, or in tests).

    `required_modules` (None: all) names the modules this process loads; a process that
    runs only some stages (the denoise worker: the DiT and the scheduler) loads only
    theirs. Every other module is an `UnloadedModule`: the stages are still built, and a
    stage that uses a module that is not loaded raises `ModuleNotLoadedError` when run.
    `stage_modules` says which modules given stages use.
    """

    _required_config_modules: list[str] = []
    phases: tuple[Phase, ...] = ()
    """The stages grouped into phases, the units of batch work (see `pipelines.phases`);
    checked against the stages when the pipeline is built."""
    default_sampling: SamplingParam = SamplingParam()
    """The family's request defaults (sizes, steps, guidance): what a request leaves unset."""
    fps: int = 16
    """The family's frame rate, for the videos written."""
    requires_image: bool = False
    """Each request must carry an `image` (image-to-video); False: an image is refused."""

    def __init__(self, model_path: str, fastvideo_args: FastVideoArgs,
                 modules: dict[str, Any] | None = None,
                 required_modules: Iterable[str] | None = None) -> None:
        self.model_path = model_path
        self.fastvideo_args = fastvideo_args
        self.model_index = read_model_index(model_path)
        # Stand-ins among the given modules (e.g. another subset pipeline's) count as absent.
        self.modules: dict[str, Any] = {name: module for name, module in (modules or {}).items()
                                        if not isinstance(module, UnloadedModule)}
        self._stages: dict[str, PipelineStage] = {}
        self.load_modules(required_modules)
        self.initialize_pipeline(fastvideo_args)
        self.create_pipeline_stages(fastvideo_args)
        if self.phases:
            check_phases(self.phases, list(self._stages), type(self).__name__)
            for phase in self.phases:
                used = self.stage_modules(phase.stages)
                if used != sorted(phase.modules):
                    raise ValueError(f"{type(self).__name__}: phase {phase.name!r} declares "
                                     f"modules {sorted(phase.modules)}, but its stages use "
                                     f"{used}")

    @classmethod
    def check_image_given(cls, image: Any, what: str = "the request") -> None:
        """ValueError unless `what` carries an image exactly when this pipeline takes one."""
        if cls.requires_image and image is None:
            raise ValueError(f"{cls.__name__} makes a video from an image, but {what} has no "
                             "image; give one (--image, generate_video(image=...), or a "
                             "dataset column 'image')")
        if not cls.requires_image and image is not None:
            raise ValueError(f"{cls.__name__} takes no image, but {what} has one ({image!r}); "
                             "use an image-to-video model or drop the image")

    @property
    def required_config_modules(self) -> list[str]:
        return list(self._required_config_modules)

    def load_modules(self, required_modules: Iterable[str] | None = None) -> None:
        """Load the `required_modules` (default: all) not given; stand-ins for the rest."""
        names = self.required_config_modules
        wanted = names if required_modules is None else list(dict.fromkeys(required_modules))
        unknown = [m for m in wanted if m not in names]
        if unknown:
            raise ValueError(f"required_modules {unknown} are not modules of "
                             f"{type(self).__name__}; its modules: {names}")
        missing = [m for m in names if m not in self.modules and m not in self.model_index]
        if missing:
            raise ValueError(
                f"{type(self).__name__} needs components {missing}, which "
                f"{self.model_path}/model_index.json does not list "
                f"(it lists {sorted(k for k in self.model_index if not k.startswith('_'))})")
        for name in wanted:
            if name not in self.modules:
                self.modules[name] = load_component(
                    name, self.model_index[name], self.model_path, self.fastvideo_args)
        loaded = sorted(self.modules)
        for name in names:
            if name not in self.modules:
                self.modules[name] = UnloadedModule(name, self.model_index[name],
                                                    Path(self.model_path) / name, loaded)

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

    def stage_modules(self, stage_names: Iterable[str]) -> list[str]:
        """The names of the modules (loaded or not) handed to the named stages, sorted
        (a stage keeps the modules injected through its constructor as attributes)."""
        held = {id(value) for name in stage_names for value in vars(self.get_stage(name)).values()}
        return sorted(name for name, module in self.modules.items() if id(module) in held)

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
