"""The engine object: builds pipelines, keeps each model's modules loaded once per
process, and runs stages; the Python API, warm workers, denoise jobs and tasks all go
through the process's one `ENGINE`.

Loading a model costs seconds (tiny) to minutes (14B), so a process loads each module
once, on the first stage that uses it, and every later call in that process reuses it:
a process that only decodes loads only the VAE, one that only encodes text only the
text encoder, and a warm worker, which runs every phase, loads all of them once.

Stage objects and modules are not re-entrant, so a call holds a lock per module its
stages use: two calls that share no module (denoising one item, decoding another) run
at the same time; two that share one (the scheduler: timesteps and denoising) take turns.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.forward_batch import ForwardBatch
from fastvideo.jobs.items import RunContext
from fastvideo.jobs.options import EngineOptions
from fastvideo.pipelines.builder import build_pipeline, build_pipeline_for_stages, model_phases
from fastvideo.pipelines.composed_pipeline_base import ComposedPipelineBase, UnloadedModule
from fastvideo.pipelines.phases import Phase
from fastvideo.storage import model_fingerprint

logger = logging.getLogger(__name__)



class Engine:
    """Pipelines by (model, options, device, dtype) and the stages they run, sharing
    loaded modules; see the module doc."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._modules: dict[str, dict[str, Any]] = {}  # by repr() of the engine settings
        self._module_locks: dict[int, threading.RLock] = {}  # by id() of the module object
        self._pipelines: dict[tuple[str, tuple[str, ...] | None], ComposedPipelineBase] = {}
        self._fingerprints: dict[str, str] = {}
        self.builds: list[dict[str, Any]] = []
        """Every pipeline this process built (stages, modules loaded, seconds): how a warm
        worker shows that it loaded its model once."""

    def pipeline(self, args: FastVideoArgs, stage_names: Sequence[str] | None = None
                 ) -> ComposedPipelineBase:
        """A pipeline for `args` that runs the named stages (None: all, as one call); the
        modules they use are loaded on first use and shared with every other pipeline of
        the same engine settings."""
        key = _settings_key(args)
        stages = tuple(stage_names) if stage_names is not None else None
        with self._lock:
            if (key, stages) not in self._pipelines:
                start = time.perf_counter()
                loaded = self._modules.setdefault(key, {})
                before = set(loaded)
                if stages is None:
                    pipeline = build_pipeline(args, modules=dict(loaded))
                else:
                    pipeline = build_pipeline_for_stages(args, stages, modules=loaded)
                loaded.update({name: module for name, module in pipeline.modules.items()
                               if not isinstance(module, UnloadedModule)})
                self._pipelines[key, stages] = pipeline
                seconds = time.perf_counter() - start
                new = sorted(set(loaded) - before)
                self.builds.append({"stages": list(stages or pipeline.stages), "loaded": new,
                                    "seconds": seconds, "device": args.device,
                                    "dtype": args.dtype})
                logger.info("stages %s: loaded %s of %s on %s in %.1f s",
                            list(stages or pipeline.stages), new or "nothing new",
                            args.model_path, args.device, seconds)
            return self._pipelines[key, stages]

    def options_pipeline(self, model_path: str, options: EngineOptions, device: str,
                         dtype: str | None, stage_names: Sequence[str] | None = None
                         ) -> ComposedPipelineBase:
        """`pipeline` for a run's engine options on `device`/`dtype`."""
        return self.pipeline(options.to_args(model_path, device, dtype), stage_names)

    def run_pipeline(self, ctx: RunContext, stage_names: Sequence[str],
                     device: str | None = None, dtype: str | None = None) -> ComposedPipelineBase:
        """The pipeline of the run's model and options on `device`/`dtype` (default the
        run's) that runs the named stages."""
        return self.options_pipeline(ctx.model_path, ctx.options, device or ctx.device,
                                     dtype or ctx.dtype, stage_names)

    def phases(self, model_path: str) -> tuple[Phase, ...]:
        """The phases of the model's pipeline (`fastvideo.pipelines.phases`)."""
        return model_phases(model_path)

    def with_fingerprint(self, ctx: RunContext) -> RunContext:
        """`ctx` with its model fingerprinted here, if the run's machine could not do it."""
        if ctx.model_fingerprint is not None:
            return ctx
        with self._lock:
            if ctx.model_path not in self._fingerprints:
                self._fingerprints[ctx.model_path] = model_fingerprint(Path(ctx.model_path))
        return replace(ctx, model_fingerprint=self._fingerprints[ctx.model_path])

    @contextlib.contextmanager
    def stage_lock(self, pipeline: ComposedPipelineBase, stage_names: Sequence[str]
                   ) -> Iterator[None]:
        """Hold the locks of the modules the named stages use (always in one order)."""
        with self._lock:
            locks = [self._module_locks.setdefault(id(pipeline.modules[name]), threading.RLock())
                     for name in pipeline.stage_modules(stage_names)]
        with contextlib.ExitStack() as stack:
            for lock in locks:
                stack.enter_context(lock)
            yield

    def run_stages(self, ctx: RunContext, stage_names: Sequence[str], batch: ForwardBatch
                   ) -> ForwardBatch:
        """Run the named stages of the run's pipeline on `batch`, in order."""
        pipeline = self.run_pipeline(ctx, stage_names)
        args = pipeline.fastvideo_args
        with self.stage_lock(pipeline, stage_names), torch.no_grad():
            for name in stage_names:
                batch = pipeline.get_stage(name)(batch, args)
        return batch


def _settings_key(args: FastVideoArgs) -> str:
    """The engine settings, with the STA window file's content (not only its name: a file
    rewritten under the same name is other settings)."""
    key = repr(args)
    if args.sta_config is not None:
        key += hashlib.sha256(Path(args.sta_config).read_bytes()).hexdigest()
    return key


ENGINE = Engine()
"""This process's engine."""
