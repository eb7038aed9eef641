"""The engine object: builds pipelines, keeps each model's modules loaded once per
process, and runs stages; the Python API, warm workers, denoise jobs and tasks all go
through the process's one `ENGINE`.

Loading a model costs seconds (tiny) to minutes (14B), so a process loads each module
once, on the first stage that uses it, and every later call in that process reuses it:
a process that only decodes loads only the VAE, one that only encodes text only the
text encoder, and a warm worker, which runs every phase, loads all of them once.

A process that knows its model before its imports are done (a warm worker) asks for its
modules early (`preload`): those of our own classes are built and get their weights on a
thread, whose copies leave the GIL, while the process goes on importing the libraries.

Stage objects and modules are not re-entrant, so a call holds a lock per module its
stages use: two calls that share no module (denoising one item, decoding another) run
at the same time; two that share one (the scheduler: timesteps and denoising) take turns.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from fastvideo.distributed import get_tp_world_size
from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.forward_batch import ForwardBatch
from fastvideo.jobs.items import RunContext
from fastvideo.jobs.options import EngineOptions
from fastvideo.models.loader.component_loader import (
    component_entries,
    finish_component,
    is_our_component,
    read_component,
    read_model_index,
)
from fastvideo.models.registry import resolve_model
from fastvideo.pipelines.builder import build_pipeline, build_pipeline_for_stages, model_phases
from fastvideo.pipelines.composed_pipeline_base import ComposedPipelineBase, UnloadedModule
from fastvideo.pipelines.phases import Phase
from fastvideo.storage import model_fingerprint

logger = logging.getLogger(__name__)
READ_AHEAD_ENV = "FASTVIDEO_READ_AHEAD"
"""`0`: `Engine.preload` does nothing (every module loads when a pipeline first needs it)."""


class Engine:
    """Pipelines by (model, options, device, dtype) and the stages they run, sharing
    loaded modules; see the module doc."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._modules: dict[str, dict[str, Any]] = {}  # by repr() of the engine settings
        self._module_locks: dict[int, threading.RLock] = {}  # by id() of the module object
        self._pipelines: dict[tuple[str, tuple[str, ...] | None], ComposedPipelineBase] = {}
        self._fingerprints: dict[str, str] = {}
        self._preloads: dict[str, dict[str, Future[Any]]] = {}  # by settings key, then name
        self.builds: list[dict[str, Any]] = []
        """Every pipeline this process built (stages, modules loaded, of those the ones built
        ahead by `preload`, seconds): how a warm worker shows that it loaded its model once."""

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
                preloaded = self._take_preloads(key, args, loaded)
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
                                    "preloaded": preloaded, "seconds": seconds,
                                    "device": args.device, "dtype": args.dtype})
                logger.info("stages %s: loaded %s of %s on %s in %.1f s",
                            list(stages or pipeline.stages), new or "nothing new",
                            args.model_path, args.device, seconds)
            return self._pipelines[key, stages]

    def preload(self, args: FastVideoArgs, names: Sequence[str] | None = None) -> list[str]:
        """Start building components of `args`' model on a thread now; returns their names.

        Default: the components our own classes implement (the text encoders, the DiT),
        whose weights go to the device in copies that leave the GIL, so a caller that goes
        on importing the libraries (seconds) gets them almost for free. Their classes are
        imported here, before the thread starts: the thread imports nothing. The next
        `pipeline` of these settings waits for them, finishes them (attention backends,
        compiling) and takes them; an error on the thread is raised there.
        """
        if os.environ.get(READ_AHEAD_ENV, "1") == "0":
            return []
        key = _settings_key(args)
        index = read_model_index(args.model_path)
        if names is None:
            names = [name for name, spec in component_entries(index) if is_our_component(spec)]
        with self._lock:
            loaded = self._modules.get(key, {})
            pending = self._preloads.setdefault(key, {})
            names = [name for name in names if name not in loaded and name not in pending]
            if not names:
                return []
            for name in names:
                if name not in index or name.startswith("_"):
                    raise ValueError(f"cannot preload {name!r}: {args.model_path}/"
                                     f"model_index.json lists no such component")
                resolve_model(index[name][1], index[name][0]).load_class()
            futures: dict[str, Future[Any]] = {name: Future() for name in names}
            pending.update(futures)
        threading.Thread(target=_read_components, args=(args, index, futures),
                         name="fastvideo-preload", daemon=True).start()
        return names

    def _take_preloads(self, key: str, args: FastVideoArgs, loaded: dict[str, Any]
                       ) -> list[str]:
        """The modules `preload` started for these settings, finished, into `loaded`; returns
        their names."""
        error: BaseException | None = None
        taken: list[str] = []
        for name, future in self._preloads.pop(key, {}).items():
            try:
                module = future.result()
            except BaseException as exc:  # noqa: BLE001 - raised below, after the others
                error = error or exc
                continue
            loaded[name] = finish_component(name, module, args)
            taken.append(name)
        if error is not None:
            raise error
        return taken

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


def _read_components(args: FastVideoArgs, index: dict[str, Any],
                     futures: dict[str, Future[Any]]) -> None:
    """`Engine.preload`'s thread: each component built with its weights, in turn. Every
    future ends set (a result or the error), so the pipeline waiting for them never hangs."""
    start = time.perf_counter()
    for name, future in futures.items():
        try:
            if args.device.startswith("cuda:"):
                torch.cuda.set_device(args.device)  # the current device is per thread
            module = read_component(name, index[name], args.model_path, args)
        except BaseException as exc:  # noqa: BLE001 - handed to the pipeline that takes it
            future.set_exception(exc)
            continue
        try:
            _warm_up_on_device(name, module, args)
        finally:
            future.set_result(module)
    logger.info("read %s ahead on a thread in %.2f s", ", ".join(futures),
                time.perf_counter() - start)


def _warm_up_on_device(name: str, module: Any, args: FastVideoArgs) -> None:
    """A text encoder's first call on a GPU (its BLAS library's start, kernel loads: part
    of a fresh worker's first text encoding) made on the preload thread, beside the
    imports. Single-process models only (a sharded one would need its peers); a failure
    only costs the first request those seconds again."""
    warm_up = getattr(module, "warm_up_on_device", None)
    if not args.device.startswith("cuda") or not callable(warm_up) or get_tp_world_size() > 1:
        return
    try:
        warm_up()
    except Exception as exc:  # noqa: BLE001 - an optimisation: the load goes on
        logger.warning("warming %s up on %s failed, so its first request pays its first "
                       "call: %s: %s", name, args.device, type(exc).__name__, exc)


def _settings_key(args: FastVideoArgs) -> str:
    """The engine settings, with the STA window file's content (not only its name: a file
    rewritten under the same name is other settings)."""
    key = repr(args)
    if args.sta_config is not None:
        key += hashlib.sha256(Path(args.sta_config).read_bytes()).hexdigest()
    return key


ENGINE = Engine()
"""This process's engine."""
