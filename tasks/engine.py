"""The engine as tasks see it: modules loaded once per process, stages run one batch at a time.

Loading a model costs seconds (tiny) to minutes (14B), so a process loads each module
once, on the first task that runs a stage using it, and every later task run in that
process reuses it: a process that only decodes loads only the VAE, one that only
encodes text only the text encoder. A lock serialises engine calls: tasks of a
thread-pool task runner share the modules, and stage objects are not re-entrant.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from fastvideo.entrypoints.video_generator import build_pipeline_for_stages
from fastvideo.fastvideo_args import FastVideoArgs, SamplingParam
from fastvideo.pipelines.composed_pipeline_base import ComposedPipelineBase, UnloadedModule
from fastvideo.pipelines.pipeline_batch_info import ForwardBatch
from fastvideo.storage import model_fingerprint
from tasks.items import RunContext

logger = logging.getLogger(__name__)

ENGINE_LOCK = threading.RLock()
_EngineKey = tuple[str, str, str]  # model path, device, dtype
_MODULES: dict[_EngineKey, dict[str, Any]] = {}
_PIPELINES: dict[tuple[_EngineKey, tuple[str, ...]], ComposedPipelineBase] = {}


def engine_args(ctx: RunContext) -> FastVideoArgs:
    return FastVideoArgs(model_path=ctx.model_path, device=ctx.device, dtype=ctx.dtype)


def get_pipeline(ctx: RunContext, stage_names: Sequence[str]) -> ComposedPipelineBase:
    """A pipeline of the run's model, device and dtype that runs the named stages; the
    modules they use are loaded on first use and shared with every other such pipeline."""
    key = (ctx.model_path, ctx.device, ctx.dtype)
    with ENGINE_LOCK:
        if (key, tuple(stage_names)) not in _PIPELINES:
            start = time.perf_counter()
            loaded = _MODULES.setdefault(key, {})
            before = set(loaded)
            pipeline = build_pipeline_for_stages(engine_args(ctx), stage_names, modules=loaded)
            loaded.update({name: module for name, module in pipeline.modules.items()
                           if not isinstance(module, UnloadedModule)})
            _PIPELINES[key, tuple(stage_names)] = pipeline
            logger.info("stages %s: loaded %s of %s on %s in %.1f s", list(stage_names),
                        sorted(set(loaded) - before) or "nothing new", ctx.model_path,
                        ctx.device, time.perf_counter() - start)
        return _PIPELINES[key, tuple(stage_names)]


def run_stages(ctx: RunContext, stage_names: Sequence[str], batch: ForwardBatch) -> ForwardBatch:
    """Run the named stages of the run's pipeline on `batch`, in order."""
    pipeline = get_pipeline(ctx, stage_names)
    args = engine_args(ctx)
    with ENGINE_LOCK, torch.no_grad():
        for name in stage_names:
            batch = pipeline.get_stage(name)(batch, args)
    return batch


@task(name="prepare-run", cache_policy=NO_CACHE, persist_result=False)
def prepare_run(model_path: str, store_uri: str, output_uri: str, defaults: SamplingParam,
                checkpoint_every: int = 5, device: str | None = None, dtype: str | None = None,
                fps: int = 16, denoise_device: str | None = None,
                denoise_dtype: str | None = None, remote_denoise: bool = False) -> RunContext:
    """Fingerprint the model and fix the engine settings every task of the run shares.

    Denoising takes `denoise_device`/`denoise_dtype`; unset, it runs like the other stages,
    except when it is dispatched to the GPU pool (`remote_denoise`): then on CUDA, whatever
    this (possibly GPU-less) machine has.
    """
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    path = Path(model_path).resolve()
    args = FastVideoArgs(model_path=str(path), dtype=dtype, **({"device": device} if device else {}))
    if denoise_device is None:
        denoise_device = "cuda" if remote_denoise else args.device
    if denoise_dtype is None and denoise_device == args.device:
        denoise_dtype = args.dtype
    denoise_args = FastVideoArgs(model_path=str(path), device=denoise_device, dtype=denoise_dtype)
    return RunContext(model_path=str(path), model_fingerprint=model_fingerprint(path),
                      store_uri=store_uri, output_uri=output_uri, device=args.device,
                      dtype=args.dtype, denoise_device=denoise_args.device,
                      denoise_dtype=denoise_args.dtype,
                      negative_prompt=defaults.negative_prompt or "",
                      max_sequence_length=defaults.max_sequence_length,
                      checkpoint_every=checkpoint_every, fps=fps)
