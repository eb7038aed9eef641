"""The denoise job: one model load for a shard of items, resumable at every k-th step.

A job names its items, each with the checkpoints that make its input batch (prompt
embeddings, initial latents, optionally a shared negative-prompt embedding), the key of
its output checkpoint and the key of its progress checkpoint. For each item:

* an output checkpoint that exists and verifies means the item is done: it is skipped;
* else the inputs are read, and a progress checkpoint that verifies (latents, step index,
  the scheduler's full state) puts the loop back where it stopped;
* every `checkpoint_every` steps the progress checkpoint is rewritten, so a process killed
  mid-denoise loses at most that many steps, and on CPU fp32 the resumed run ends with
  bit-identical latents;
* the final latents are written as the output checkpoint and the progress one removed.

One item's failure does not stop the others. Runs in-process (`run_denoise_job`, given
an already loaded pipeline) or as its own process, also under torchrun:

    torchrun --nproc-per-node 1 -m fastvideo.entrypoints.denoise_worker \
        --store s3://bucket/run --job-key jobs/denoise/<digest>/job.json

which reads the job from the store, prints one `fastvideo-progress <item> <step> <total>`
line per step, and writes the outcomes next to the job (`result.json`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.pipelines.composed_pipeline_base import ComposedPipelineBase
from fastvideo.pipelines.pipeline_batch_info import ForwardBatch
from fastvideo.storage import (
    ArtifactStore,
    CheckpointNotFoundError,
    CheckpointRef,
    CorruptCheckpointError,
    find_checkpoint,
    open_store,
    read_checkpoint,
    retry_io,
    write_checkpoint,
)

logger = logging.getLogger(__name__)

DENOISING_STAGE = "denoising_stage"
PROGRESS_PREFIX = "fastvideo-progress"
# The request itself: cheap scalars kept in every checkpoint so each one is self-describing.
REQUEST_FIELDS = ("prompt", "negative_prompt", "height", "width", "num_frames",
                  "num_inference_steps", "guidance_scale", "seed", "max_sequence_length",
                  "request_id")
_PROGRESS_FIELDS = ("latents", "step_index", "extra")

ProgressCallback = Callable[[str, int, int], None]
"""Called as `(item_id, step, total)` after every denoising step."""


class CorruptInputError(Exception):
    """An input checkpoint is missing or fails verification; its producer must redo it."""

    def __init__(self, key: str, cause: Exception) -> None:
        super().__init__(f"input checkpoint {key} is unusable: {cause}")
        self.key = key


@dataclass(frozen=True)
class DenoiseItem:
    item_id: str
    inputs: tuple[CheckpointRef, ...]
    """Read in this order into one batch (later checkpoints overwrite the fields they hold)."""
    output_key: str
    progress_key: str


@dataclass(frozen=True)
class DenoiseJob:
    model_path: str
    store_uri: str
    """The store holding the inputs; outputs and progress go there too."""
    items: tuple[DenoiseItem, ...]
    checkpoint_every: int = 5
    """Save latents + scheduler state every this many steps."""
    device: str | None = None
    """As in `FastVideoArgs`; None picks CUDA when available."""
    dtype: str | None = None

    def __post_init__(self) -> None:
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> DenoiseJob:
        doc = json.loads(data)
        items = tuple(
            DenoiseItem(item["item_id"], tuple(CheckpointRef(**ref) for ref in item["inputs"]),
                        item["output_key"], item["progress_key"])
            for item in doc.pop("items"))
        return cls(items=items, **doc)

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.to_json()).hexdigest()

    def engine_args(self) -> FastVideoArgs:
        options = {k: v for k, v in (("device", self.device), ("dtype", self.dtype)) if v}
        return FastVideoArgs(model_path=self.model_path, **options)


@dataclass(frozen=True)
class DenoiseOutcome:
    item_id: str
    ref: CheckpointRef | None = None
    error: str | None = None
    corrupt_input: str | None = None
    """Key of the input checkpoint that was missing or corrupt, when that was the error."""
    seconds: float = 0.0
    """Denoising compute in this run (0 for a skipped item)."""
    resumed_from_step: int = 0
    skipped: bool = False
    """The output already existed and verified."""
    info: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def list_to_json(outcomes: Sequence[DenoiseOutcome]) -> bytes:
        return json.dumps([asdict(o) for o in outcomes], sort_keys=True).encode()

    @classmethod
    def list_from_json(cls, data: bytes) -> list[DenoiseOutcome]:
        outcomes = []
        for doc in json.loads(data):
            ref = doc.pop("ref")
            outcomes.append(cls(ref=CheckpointRef(**ref) if ref else None, **doc))
        return outcomes


def load_valid_checkpoint(store: ArtifactStore, key: str
                          ) -> tuple[CheckpointRef, ForwardBatch] | None:
    """The checkpoint under `key` and its batch, or None if absent or corrupt (with a warning)."""
    ref = retry_io(lambda: find_checkpoint(store, key))
    if ref is None:
        return None
    try:
        return ref, retry_io(lambda: read_checkpoint(store, ref))
    except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
        logger.warning("ignoring checkpoint %s, recomputing it: %s", store.uri(key), exc)
        return None


def read_inputs(store: ArtifactStore, refs: Sequence[CheckpointRef],
                batch: ForwardBatch | None = None) -> ForwardBatch:
    """Merge the checkpoints into one batch; `CorruptInputError` names an unusable one."""
    batch = batch if batch is not None else ForwardBatch()
    for ref in refs:
        try:
            retry_io(lambda ref=ref: read_checkpoint(store, ref, into=batch))
        except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
            raise CorruptInputError(ref.key, exc) from exc
    return batch


def delete_checkpoint(store: ArtifactStore, key: str) -> None:
    """Remove a checkpoint: its manifest first, so no reader ever sees it half-deleted."""
    keys = retry_io(lambda: store.list(f"{key}/"))
    for name in sorted(keys, key=lambda k: not k.endswith("/manifest.json")):
        retry_io(lambda name=name: store.delete(name))


def run_denoise_job(job: DenoiseJob, pipeline: ComposedPipelineBase | None = None,
                    on_progress: ProgressCallback | None = None) -> list[DenoiseOutcome]:
    """Denoise every item of `job` with one pipeline (loaded here unless given)."""
    store = open_store(job.store_uri)
    args = job.engine_args()
    if pipeline is None:
        from fastvideo.entrypoints.video_generator import build_pipeline

        pipeline = build_pipeline(args)
    stage = pipeline.get_stage(DENOISING_STAGE)
    return [_denoise_item(store, item, stage, args, job.checkpoint_every, on_progress)
            for item in job.items]


def _denoise_item(store: ArtifactStore, item: DenoiseItem, stage: Any, args: FastVideoArgs,
                  checkpoint_every: int, on_progress: ProgressCallback | None) -> DenoiseOutcome:
    try:
        done = load_valid_checkpoint(store, item.output_key)
        if done is not None:
            return DenoiseOutcome(item.item_id, ref=done[0], skipped=True)
        batch = read_inputs(store, item.inputs)
        progress = load_valid_checkpoint(store, item.progress_key)
        if progress is not None:
            for name in _PROGRESS_FIELDS:
                setattr(batch, name, getattr(progress[1], name))
        resumed_from = batch.step_index
        if resumed_from:
            logger.info("item %s: resuming denoising at step %d/%d", item.item_id,
                        resumed_from, batch.num_inference_steps)

        def on_step_end(b: ForwardBatch, step: int, total: int) -> None:
            if step % checkpoint_every == 0 and step < total:
                retry_io(lambda: write_checkpoint(store, item.progress_key, b, _PROGRESS_FIELDS))
            if on_progress is not None:
                on_progress(item.item_id, step, total)

        stage.on_step_end = on_step_end
        try:
            with torch.no_grad():
                batch = stage(batch, args)
        finally:
            stage.on_step_end = None
        ref = retry_io(lambda: write_checkpoint(store, item.output_key, batch,
                                                (*REQUEST_FIELDS, "latents")))
        delete_checkpoint(store, item.progress_key)
        return DenoiseOutcome(item.item_id, ref=ref, seconds=batch.timings[stage.name],
                              resumed_from_step=resumed_from)
    except CorruptInputError as exc:
        return DenoiseOutcome(item.item_id, error=str(exc), corrupt_input=exc.key)
    except Exception as exc:  # one item's failure must not stop the shard
        logger.exception("item %s: denoising failed", item.item_id)
        return DenoiseOutcome(item.item_id, error=f"{type(exc).__name__}: {exc}")


def result_key(job_key: str) -> str:
    """Where the outcomes of the job stored under `job_key` go."""
    return f"{job_key.rsplit('/', 1)[0]}/result.json"


def _print_progress(item_id: str, step: int, total: int) -> None:
    print(f"{PROGRESS_PREFIX} {item_id} {step} {total}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True, help="store URI holding the job")
    parser.add_argument("--job-key", required=True, help="key of the job's JSON in the store")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        raise NotImplementedError(
            f"WORLD_SIZE={world_size}: the denoise worker runs one process per node until "
            "sequence-parallel denoising lands; use --nproc-per-node 1")
    store = open_store(args.store)
    job = DenoiseJob.from_json(retry_io(lambda: store.get_bytes(args.job_key)))
    start = time.perf_counter()
    outcomes = run_denoise_job(job, on_progress=_print_progress)
    retry_io(lambda: store.put_bytes(result_key(args.job_key),
                                     DenoiseOutcome.list_to_json(outcomes)))
    failed = sum(o.error is not None for o in outcomes)
    logger.info("denoised %d item(s), %d failed, in %.1f s", len(outcomes), failed,
                time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
