"""Every stage of a shard's items in one process, with the GPU kept busy between items.

Two lanes, each one thread, each FIFO:

* the **GPU lane** encodes an item's prompt, prepares its latents and denoises it;
* the **post lane** writes the denoised checkpoint, decodes (on its own CUDA stream, of
  lower priority than the GPU lane's), stores the frames and writes the mp4.

So item k's decoding and video writing overlap item k+1's denoising, and the checkpoint
uploads of denoising's progress go to a third thread: the loop never waits on the store.
The two lanes use different modules (the DiT and scheduler; the VAE), so neither waits
for the other's lock. Every stage still writes its checkpoint under the same key as the
one-stage-per-task path (`item_stages`), so a killed worker's shard resumes from them,
and the outputs are the same bit for bit (`overlap=False` runs the lanes in turn: tested
equal).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from fastvideo.jobs import item_stages
from fastvideo.jobs.denoise import (
    DENOISING_STAGE,
    Denoised,
    DenoiseItem,
    DenoiseOutcome,
    ItemRunner,
)
from fastvideo.jobs.engine import get_pipeline, stage_lock, with_fingerprint
from fastvideo.jobs.item_stages import (
    DECODE,
    DENOISE,
    ENCODE_NEGATIVE,
    ENCODE_TEXT,
    PREPARE_LATENTS,
    STAGES,
    WRITE_VIDEO,
)
from fastvideo.jobs.items import ItemResult, ItemSpec, RunContext, Shard, failure, to_jsonable
from fastvideo.storage import ArtifactStore, CorruptInputError, StoreUnavailableError, open_store

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
        return self._gpu.submit(work).result()

    def store(self, uri: str) -> ArtifactStore:
        if uri not in self._stores:
            self._stores[uri] = open_store(uri)
        return self._stores[uri]

    def run(self, ctx: RunContext, shard: Shard, emit: Emit,
            cancelled: Callable[[], bool] = lambda: False) -> ShardResults:
        """Every stage for every item of `shard`; returns when all are done or failed."""
        ctx = with_fingerprint(ctx)
        negative = None
        if any(i.guidance_scale > 1.0 and i.shared_negative for i in shard.items):
            negative = self._gpu.submit(self._negative, ctx).result()
        fronts = [self._gpu.submit(self._front, ctx, item, negative, emit, cancelled)
                  for item in shard.items]
        per_item = [front.result().result() for front in fronts]
        return {stage: [_carry(results, stage) for results in per_item] for stage in STAGES}

    def _negative(self, ctx: RunContext) -> ItemResult:
        """The run's negative embedding, once per shard: computed the first time, then a
        verified read (never remembered across shards: its checkpoint may be gone since)."""
        return _guarded(ENCODE_NEGATIVE, "negative", lambda: item_stages.encode_negative(
            ctx, self.store(ctx.store_uri)))

    def _front(self, ctx: RunContext, item: ItemSpec, negative: ItemResult | None, emit: Emit,
               cancelled: Callable[[], bool]) -> Future[dict[str, ItemResult]]:
        """The GPU lane's share of an item; returns the future of its post-lane share."""
        start = time.time()
        results: dict[str, ItemResult] = {}
        store = self.store(ctx.store_uri)

        def stage(name: str, work: Callable[[], ItemResult]) -> bool:
            results[name] = _guarded(name, item.item_id, work)
            emit({"event": "stage", "stage": name, "item_id": item.item_id,
                  "result": to_jsonable(results[name])})
            return results[name].ok

        if cancelled():
            results[ENCODE_TEXT] = failure(item.item_id, ENCODE_TEXT, "the request was cancelled")
            return _done(results)
        shared = item_stages.NegativeEmbedding(store, negative)
        if not (stage(ENCODE_TEXT, lambda: item_stages.encode_text(ctx, store, item, shared))
                and stage(PREPARE_LATENTS,
                          lambda: item_stages.prepare_latents(ctx, store, item))):
            return _done(results)
        job_item = item_stages.denoise_item(ctx, item.item_id, item_stages.denoise_inputs(
            item, results[ENCODE_TEXT], results[PREPARE_LATENTS], negative))
        runner = self._denoiser(ctx, store, emit)
        pipeline = get_pipeline(ctx, [DENOISING_STAGE])
        with stage_lock(pipeline, [DENOISING_STAGE]):
            computed = runner.compute(job_item)
        if isinstance(computed, Denoised):
            # Off the device on this lane's stream, so the post lane's stream sees it whole.
            computed.batch.latents = computed.batch.latents.cpu()
        self.timeline.add(item.item_id, "gpu", start, time.time())
        post = lambda: self._post_work(ctx, item, runner, job_item, computed, results, stage)  # noqa: E731
        if self._post is None:
            return _done(post())
        return self._post.submit(post)

    def _post_work(self, ctx: RunContext, item: ItemSpec, runner: ItemRunner,
                   job_item: DenoiseItem, computed: DenoiseOutcome | Denoised,
                   results: dict[str, ItemResult],
                   stage: Callable[[str, Callable[[], ItemResult]], bool]
                   ) -> dict[str, ItemResult]:
        start = time.time()
        store, output = self.store(ctx.store_uri), self.store(ctx.output_uri)
        batch = computed.batch if isinstance(computed, Denoised) else None
        outcome = runner.finish(job_item, computed) if batch is not None else computed
        denoised_ok = stage(DENOISE, lambda: item_stages.denoise_result(outcome))
        if denoised_ok and stage(DECODE, lambda: item_stages.decode(
                ctx, store, item, results[DENOISE].ref, batch)):
            stage(WRITE_VIDEO, lambda: item_stages.write_video(
                ctx, store, output, item, results[DECODE].ref))
        self.timeline.add(item.item_id, "post", start, time.time())
        return results

    def _denoiser(self, ctx: RunContext, store: ArtifactStore, emit: Emit) -> ItemRunner:
        pipeline = get_pipeline(ctx, [DENOISING_STAGE])

        def on_progress(item_id: str, step: int, total: int) -> None:
            emit({"event": "step", "item_id": item_id, "step": step, "total": total})

        return ItemRunner(store=store, stage=pipeline.get_stage(DENOISING_STAGE),
                          args=pipeline.fastvideo_args, checkpoint_every=ctx.checkpoint_every,
                          on_progress=on_progress, group=None, uploads=self._uploads)


def _guarded(stage: str, item_id: str, work: Callable[[], ItemResult]) -> ItemResult:
    """`work()`, or the item's failure in `stage` (one item's failure stops no other)."""
    try:
        return work()
    except StoreUnavailableError as exc:
        logger.error("%s item %s: store unavailable: %s", stage, item_id, exc)
        return failure(item_id, stage, f"StoreUnavailableError: {exc}")
    except CorruptInputError as exc:
        logger.warning("%s item %s: %s", stage, item_id, exc)
        return failure(item_id, stage, str(exc), corrupt_input=exc.key)
    except Exception as exc:
        logger.error("%s item %s failed: %s", stage, item_id, exc,
                     exc_info=not isinstance(exc, ValueError))
        return failure(item_id, stage, f"{type(exc).__name__}: {exc}")


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
