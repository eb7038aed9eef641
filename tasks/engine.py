"""The engine as tasks see it: one pipeline per process, stages run one batch at a time.

Loading a model costs seconds (tiny) to minutes (14B), so a process loads it once and
every task run in that process reuses it. A lock serialises engine calls: tasks of a
thread-pool task runner share one pipeline, and stage objects are not re-entrant.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from fastvideo.entrypoints.video_generator import build_pipeline
from fastvideo.fastvideo_args import FastVideoArgs, SamplingParam
from fastvideo.pipelines.composed_pipeline_base import ComposedPipelineBase
from fastvideo.pipelines.pipeline_batch_info import ForwardBatch
from fastvideo.storage import model_fingerprint
from tasks.items import RunContext

logger = logging.getLogger(__name__)

ENGINE_LOCK = threading.RLock()
_PIPELINES: dict[tuple[str, str, str], ComposedPipelineBase] = {}


def engine_args(ctx: RunContext) -> FastVideoArgs:
    return FastVideoArgs(model_path=ctx.model_path, device=ctx.device, dtype=ctx.dtype)


def get_pipeline(ctx: RunContext) -> ComposedPipelineBase:
    """The pipeline for the run's model, device and dtype, loaded on first use."""
    key = (ctx.model_path, ctx.device, ctx.dtype)
    with ENGINE_LOCK:
        if key not in _PIPELINES:
            start = time.perf_counter()
            _PIPELINES[key] = build_pipeline(engine_args(ctx))
            logger.info("loaded %s on %s in %.1f s", ctx.model_path, ctx.device,
                        time.perf_counter() - start)
        return _PIPELINES[key]


def run_stages(ctx: RunContext, stage_names: Sequence[str], batch: ForwardBatch) -> ForwardBatch:
    """Run the named stages of the run's pipeline on `batch`, in order."""
    pipeline = get_pipeline(ctx)
    args = engine_args(ctx)
    with ENGINE_LOCK, torch.no_grad():
        for name in stage_names:
            batch = pipeline.get_stage(name)(batch, args)
    return batch


@task(name="prepare-run", cache_policy=NO_CACHE, persist_result=False)
def prepare_run(model_path: str, store_uri: str, output_uri: str, defaults: SamplingParam,
                checkpoint_every: int = 5, device: str | None = None, dtype: str | None = None,
                fps: int = 16) -> RunContext:
    """Fingerprint the model and fix the engine settings every task of the run shares."""
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    path = Path(model_path).resolve()
    args = FastVideoArgs(model_path=str(path), dtype=dtype, **({"device": device} if device else {}))
    return RunContext(model_path=str(path), model_fingerprint=model_fingerprint(path),
                      store_uri=store_uri, output_uri=output_uri, device=args.device,
                      dtype=args.dtype, negative_prompt=defaults.negative_prompt or "",
                      max_sequence_length=defaults.max_sequence_length,
                      checkpoint_every=checkpoint_every, fps=fps)
