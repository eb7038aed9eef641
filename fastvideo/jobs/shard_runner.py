"""Every phase of a shard's items in one process, with the GPU kept busy between items.

Two lanes, each one thread, each FIFO:

* the **GPU lane** runs an item's phases up to denoising, included (Wan: text, latents,
  denoise; I2V also the image);
* the **post lane** writes the denoised checkpoint, runs the phases after it (decoding,
  on its own CUDA stream of lower priority than the GPU lane's), and writes the mp4.

So item k's decoding and video writing overlap item k+1's denoising, and the checkpoint
uploads of denoising's progress go to a third thread: the loop never waits on the store.
Modules shared by the lanes (the VAE, when an image phase encodes with it) take turns
through the engine's module locks. Every phase writes its checkpoint under the same key
as the one-task-per-phase path (`item_phases`), so a killed worker's shard resumes from
them, and the outputs are the same bit for bit (`overlap=False` runs the lanes in turn:
tested equal).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from fastvideo.jobs import item_phases
from fastvideo.jobs.denoise import (
    Denoised,
    DenoiseItem,
    DenoiseOutcome,
    ItemRunner,
    denoise_stage,
)
from fastvideo.jobs.engine import ENGINE
from fastvideo.jobs.item_phases import ENCODE_NEGATIVE, WRITE_VIDEO, guarded, phase_inputs
from fastvideo.jobs.items import ItemResult, ItemSpec, RunContext, Shard, failure, to_jsonable
from fastvideo.jobs.step_clock import FirstDenoiseClock
from fastvideo.jobs.training_data import write_training_part
from fastvideo.jobs.video_stream import StreamedVideo, streaming_enabled
from fastvideo.pipelines.builder import model_phases
from fastvideo.pipelines.phases import Phase
from fastvideo.pipelines.stages.decoding import frame_sink
from fastvideo.storage import ArtifactStore, open_store

logger = logging.getLogger(__name__)
T = TypeVar("T")

Emit = Callable[[dict[str, Any]], None]
"""Receives the runner's events: `{"event": "stage", "stage", "item_id", "result"}` when an
item finishes a stage, `{"event": "step", "item_id", "step", "total"}` per denoising step."""
ShardResults = dict[str, list[ItemResult]]
"""Per stage, each item's result in shard order (an item failed earlier keeps its failure)."""


@dataclass
class Timeline:
    """When each item's lanes ran (epoch seconds): how a benchmark sees idle time."""

    items: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, item_id: str, lane: str, start: float, end: float) -> None:
        with self.lock:
            self.items.append({"item_id": item_id, "lane": lane, "start": start, "end": end})

    def as_list(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.items)


class ShardRunner:
    """Runs shards through every stage; one per process, shared by its callers."""

    def __init__(self, overlap: bool = True) -> None:
        self.overlap = overlap
        self._gpu = ThreadPoolExecutor(1, thread_name_prefix="fastvideo-gpu-lane",
                                       initializer=_use_stream, initargs=(True,))
        self._post = ThreadPoolExecutor(1, thread_name_prefix="fastvideo-post-lane",
                                        initializer=_use_stream, initargs=(False,)) \
            if overlap else None
        self._uploads = ThreadPoolExecutor(1, thread_name_prefix="fastvideo-uploads") \
            if overlap else None
        self._stores: dict[str, ArtifactStore] = {}
        self.timeline = Timeline()

    def close(self) -> None:
        for pool in (self._gpu, self._post, self._uploads):
            if pool is not None:
                pool.shutdown(wait=True)

    def on_gpu_lane(self, work: Callable[[], T]) -> T:
        """Run `work` on the GPU lane, after the items queued before it."""
        return self.submit_on_gpu_lane(work).result()

    def submit_on_gpu_lane(self, work: Callable[[], T]) -> Future[T]:
        """Queue `work` on the GPU lane, after the items queued before it."""
        return self._gpu.submit(work)

    def store(self, uri: str) -> ArtifactStore:
        if uri not in self._stores:
            self._stores[uri] = open_store(uri)
        return self._stores[uri]

    def run(self, ctx: RunContext, shard: Shard, emit: Emit,
            cancelled: Callable[[], bool] = lambda: False) -> ShardResults:
        """Every phase for every item of `shard`; returns when all are done or failed."""
        ctx = ENGINE.with_fingerprint(ctx)
        phases = model_phases(ctx.model_path)
        # The whole shard is queued on the lane at once (the lane runs its work in order, so
        # the negative is ready before the fronts): waiting here for the negative let a later
        # shard's work overtake this one's, and left the GPU idle while this thread woke up.
        negative: Future[ItemResult] | None = None
        if any(p.shared_negative for p in phases) and any(
                item_phases.uses_shared_negative(i) for i in shard.items):
            negative = self._gpu.submit(self._negative, ctx, phases)
        fronts = [self._gpu.submit(self._front, ctx, phases, item, negative, emit, cancelled)
                  for item in shard.items]
        per_item = [front.result().result() for front in fronts]
        results = {stage: [_carry(results, stage) for results in per_item]
                   for stage in item_phases.stage_names(phases)}
        if ctx.training_data:
            try:
                write_training_part(self.store(ctx.store_uri), self.store(ctx.output_uri),
                                    shard, phases, results)
            except Exception:  # the videos are made; the rerun writes the part again
                logger.exception("shard %d: writing its training data failed", shard.index)
        return results

    def _negative(self, ctx: RunContext, phases: tuple[Phase, ...]) -> ItemResult:
        """The run's negative embedding, once per shard: computed the first time, then a
        verified read (never remembered across shards: its checkpoint may be gone since)."""
        return guarded(ENCODE_NEGATIVE, "negative", lambda: item_phases.encode_negative(
            ctx, self.store(ctx.store_uri), phases), logger)

    def _front(self, ctx: RunContext, phases: tuple[Phase, ...], item: ItemSpec,
               negative_run: Future[ItemResult] | None, emit: Emit,
               cancelled: Callable[[], bool]) -> Future[dict[str, ItemResult]]:
        """The GPU lane's share of an item (the phases up to denoising, included); returns
        the future of its post-lane share."""
        start = time.time()
        negative = negative_run.result() if negative_run is not None else None  # ran before
        results: dict[str, ItemResult] = {}
        store = self.store(ctx.store_uri)

        def stage(name: str, work: Callable[[], ItemResult]) -> bool:
            results[name] = guarded(name, item.item_id, work, logger)
            emit({"event": "stage", "stage": name, "item_id": item.item_id,
                  "result": to_jsonable(results[name])})
            return results[name].ok

        if cancelled():
            results[phases[0].name] = failure(item.item_id, phases[0].name,
                                              "the request was cancelled")
            return _done(results)
        shared = item_phases.NegativeEmbedding(store, negative)
        index = next(i for i, p in enumerate(phases) if p.denoise)
        for i, phase in enumerate(phases[:index]):
            if not stage(phase.name, lambda i=i, phase=phase: item_phases.run_phase(
                    ctx, store, phase, item, phase_inputs(phases, i, results, item, negative),
                    shared)):
                return _done(results)
        try:
            inputs = phase_inputs(phases, index, results, item, negative)
        except ValueError as exc:
            error = failure(item.item_id, phases[index].name, str(exc))
            stage(phases[index].name, lambda: error)
            return _done(results)
        job_item = item_phases.denoise_item(ctx, phases[index], item.item_id, inputs)
        runner = self._denoiser(ctx, phases[index], store, emit)
        pipeline = ENGINE.run_pipeline(ctx, phases[index].stages)
        with ENGINE.stage_lock(pipeline, phases[index].stages):
            FIRST_DENOISE.start(item.item_id)
            computed = runner.compute(job_item)
            FIRST_DENOISE.done(item.item_id)
        if isinstance(computed, Denoised):
            # Off the device on this lane's stream, so the post lane's stream sees it whole.
            for name in phases[index].writes:
                value = getattr(computed.batch, name)
                if isinstance(value, torch.Tensor):
                    setattr(computed.batch, name, value.cpu())
        self.timeline.add(item.item_id, "gpu", start, time.time())
        post = lambda: self._post_work(ctx, phases, index, item, runner, job_item, computed,  # noqa: E731
                                       results, stage)
        if self._post is None:
            return _done(post())
        return self._post.submit(post)

    def _post_work(self, ctx: RunContext, phases: tuple[Phase, ...], index: int,
                   item: ItemSpec, runner: ItemRunner, job_item: DenoiseItem,
                   computed: DenoiseOutcome | Denoised, results: dict[str, ItemResult],
                   stage: Callable[[str, Callable[[], ItemResult]], bool]
                   ) -> dict[str, ItemResult]:
        """The phases after denoising, then the video."""
        start = time.time()
        store, output = self.store(ctx.store_uri), self.store(ctx.output_uri)
        batch = computed.batch if isinstance(computed, Denoised) else None
        outcome = runner.finish(job_item, computed) if batch is not None else computed
        ok = stage(phases[index].name,
                   lambda: item_phases.denoise_result(phases[index], outcome))
        kept: dict[str, Any] = {}  # the last phase's output: its frames, already here
        # The mp4 encoded while the frames are decoded (video_stream.py).
        streamed = StreamedVideo(ctx.fps) if streaming_enabled() else None
        try:
            with frame_sink(streamed) if streamed is not None else nullcontext():
                for i in range(index + 1, len(phases)):
                    if not ok:
                        break
                    phase = phases[i]
                    given = batch if i == index + 1 else None  # the denoised batch, here
                    ok = stage(phase.name, lambda i=i, phase=phase, given=given:
                               item_phases.run_phase(
                                   ctx, store, phase, item,
                                   phase_inputs(phases, i, results, item, None),
                                   batch=given, keep=kept))
            if ok:
                last = phases[-1]
                frames = getattr(kept["batch"], last.frames) if "batch" in kept else None
                stage(WRITE_VIDEO, lambda: item_phases.write_video(
                    ctx, store, output, item, last, results[last.name].ref, frames,
                    streamed))
        finally:
            if streamed is not None:
                streamed.cleanup()
        self.timeline.add(item.item_id, "post", start, time.time())
        return results

    def _denoiser(self, ctx: RunContext, phase: Phase, store: ArtifactStore, emit: Emit
                  ) -> ItemRunner:
        pipeline = ENGINE.run_pipeline(ctx, phase.stages)

        def on_progress(item_id: str, step: int, total: int) -> None:
            FIRST_DENOISE.step(item_id, step, total)
            emit({"event": "step", "item_id": item_id, "step": step, "total": total})

        return ItemRunner(store=store, stage=denoise_stage(pipeline, phase), phase=phase,
                          args=pipeline.fastvideo_args, checkpoint_every=ctx.checkpoint_every,
                          on_progress=on_progress, group=None, uploads=self._uploads)


FIRST_DENOISE = FirstDenoiseClock()
"""This process's first denoise, timed per step (`fastvideo.jobs.step_clock`)."""


def _carry(results: dict[str, ItemResult], stage: str) -> ItemResult:
    """The item's result in `stage`, or the failure that stopped it before."""
    if stage in results:
        return results[stage]
    return next(r for r in results.values() if not r.ok)


def _done(results: dict[str, ItemResult]) -> Future[dict[str, ItemResult]]:
    future: Future[dict[str, ItemResult]] = Future()
    future.set_result(results)
    return future


def _use_stream(high_priority: bool) -> None:
    """Give a lane its own CUDA stream, so decoding runs beside denoising; the GPU lane's
    has the higher priority, so the DiT, the critical path, goes first and decoding fills
    the gaps."""
    if torch.cuda.is_available():
        # 0 is the lowest priority; out-of-range values map to the highest there is.
        torch.cuda.set_stream(torch.cuda.Stream(priority=-100 if high_priority else 0))
