"""The engine as batch jobs see it: modules loaded once per process, stages run one batch at a time.

Loading a model costs seconds (tiny) to minutes (14B), so a process loads each module
once, on the first stage that uses it, and every later call in that process reuses it:
a process that only decodes loads only the VAE, one that only encodes text only the
text encoder, and a warm worker, which runs every stage, loads all of them once.

Stage objects and modules are not re-entrant, so a call holds a lock per module its
stages use: two calls that share no module (denoising one item, decoding another) run
at the same time; two that share one (the scheduler: timesteps and denoising) take turns.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from fastvideo.jobs.items import RunContext
from fastvideo.jobs.options import EngineOptions
from fastvideo.pipelines.builder import build_pipeline_for_stages
from fastvideo.pipelines.composed_pipeline_base import ComposedPipelineBase, UnloadedModule
from fastvideo.forward_batch import ForwardBatch
from fastvideo.storage import model_fingerprint

logger = logging.getLogger(__name__)

_CACHE_LOCK = threading.RLock()
_EngineKey = tuple[str, str, str, str]  # model path, device, dtype, options
_MODULES: dict[_EngineKey, dict[str, Any]] = {}
_MODULE_LOCKS: dict[int, threading.RLock] = {}  # by id() of the module object
_PIPELINES: dict[tuple[_EngineKey, tuple[str, ...]], ComposedPipelineBase] = {}
_FINGERPRINTS: dict[str, str] = {}
BUILDS: list[dict[str, Any]] = []
"""Every pipeline this process built (stages, modules loaded, seconds): how a warm worker
shows that it loaded its model once."""


def _key(model_path: str, options: EngineOptions, device: str, dtype: str) -> _EngineKey:
    return (model_path, device, dtype, repr(options))


def with_fingerprint(ctx: RunContext) -> RunContext:
    """`ctx` with its model fingerprinted here, if the run's machine could not do it."""
    if ctx.model_fingerprint is not None:
        return ctx
    with _CACHE_LOCK:
        if ctx.model_path not in _FINGERPRINTS:
            _FINGERPRINTS[ctx.model_path] = model_fingerprint(Path(ctx.model_path))
    return replace(ctx, model_fingerprint=_FINGERPRINTS[ctx.model_path])


def get_pipeline(ctx: RunContext, stage_names: Sequence[str], device: str | None = None,
                 dtype: str | None = None) -> ComposedPipelineBase:
    """A pipeline of the run's model and options on `device`/`dtype` (default the run's)
    that runs the named stages; see `pipeline_for`."""
    return pipeline_for(ctx.model_path, ctx.options, device or ctx.device, dtype or ctx.dtype,
                        stage_names)


def pipeline_for(model_path: str, options: EngineOptions, device: str, dtype: str,
                 stage_names: Sequence[str]) -> ComposedPipelineBase:
    """A pipeline that runs the named stages; the modules they use are loaded on first use
    and shared with every other pipeline of the same model, options, device and dtype."""
    key = _key(model_path, options, device, dtype)
    with _CACHE_LOCK:
        if (key, tuple(stage_names)) not in _PIPELINES:
            start = time.perf_counter()
            loaded = _MODULES.setdefault(key, {})
            before = set(loaded)
            args = options.to_args(model_path, device, dtype)
            pipeline = build_pipeline_for_stages(args, stage_names, modules=loaded)
            loaded.update({name: module for name, module in pipeline.modules.items()
                           if not isinstance(module, UnloadedModule)})
            _PIPELINES[key, tuple(stage_names)] = pipeline
            seconds = time.perf_counter() - start
            new = sorted(set(loaded) - before)
            BUILDS.append({"stages": list(stage_names), "loaded": new, "seconds": seconds,
                           "device": device, "dtype": dtype})
            logger.info("stages %s: loaded %s of %s on %s in %.1f s", list(stage_names),
                        new or "nothing new", model_path, device, seconds)
        return _PIPELINES[key, tuple(stage_names)]


@contextlib.contextmanager
def stage_lock(pipeline: ComposedPipelineBase, stage_names: Sequence[str]) -> Iterator[None]:
    """Hold the locks of the modules the named stages use (always in one order)."""
    with _CACHE_LOCK:
        locks = [_MODULE_LOCKS.setdefault(id(pipeline.modules[name]), threading.RLock())
                 for name in pipeline.stage_modules(stage_names)]
    with contextlib.ExitStack() as stack:
        for lock in locks:
            stack.enter_context(lock)
        yield


def run_stages(ctx: RunContext, stage_names: Sequence[str], batch: ForwardBatch) -> ForwardBatch:
    """Run the named stages of the run's pipeline on `batch`, in order."""
    pipeline = get_pipeline(ctx, stage_names)
    args = pipeline.fastvideo_args
    with stage_lock(pipeline, stage_names), torch.no_grad():
        for name in stage_names:
            batch = pipeline.get_stage(name)(batch, args)
    return batch
