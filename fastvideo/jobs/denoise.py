"""The denoise job: one model load for a shard of items, resumable at every k-th step.

A job names its items, each with the checkpoints that make its input batch (prompt
embeddings, initial latents, optionally a shared negative-prompt embedding), the key of
its output checkpoint and the key of its progress checkpoint. For each item:

* an output checkpoint that exists and verifies means the item is done: it is skipped;
* else the inputs are read, and a progress checkpoint that verifies (latents, step index,
  the scheduler's full state) puts the loop back where it stopped;
* every `checkpoint_every` steps the progress checkpoint is rewritten, so a process killed
  mid-denoise loses at most that many steps, and on CPU fp32 the resumed run ends with
  bit-identical latents (a progress write that fails is logged and skipped: it only
  saves work, the output write decides);
* the final latents are written as the output checkpoint and the progress one removed.

One item's failure does not stop the others. Runs in-process (`run_denoise_job`, given
an already loaded pipeline: a Prefect task, a warm worker) or as its own process(es)
under torchrun (`fastvideo.entrypoints.denoise_worker`).

A job loads only what denoising uses: the DiT and the scheduler. With N > 1 processes
every rank loads them and the DiT runs sequence parallel over `--sp-size` of them (all N
by default; tp 1). With a smaller sp size the N processes form N / sp replicas (ranks
`[r * sp, (r + 1) * sp)`), and replica r denoises items r, r + N / sp, ...: many items
finish sooner this way, one item sooner with one replica of all N. Only the first rank of
a replica touches the store: it reads each item's checkpoints, decides skip or run (and
from which step), and sends the replica's other ranks the item's input batch (latents,
embeddings, timesteps, scheduler state), as tensor broadcasts of the checkpoint encoding
(safetensors + parquet bytes, nothing pickled). The replica's ranks then run the loop
together, and its first rank writes progress and output. Rank 0 reads the job, sends it
to all, gathers every replica's outcomes and writes them. An error while the ranks compute together
(a rank that dies, runs out of memory, or fails a collective) ends the whole job: every
rank exits, torchrun stops the rest, and a rerun resumes each unfinished item from its
last progress checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from fastvideo.distributed import (
    GroupCoordinator,
    get_sp_group,
    get_sp_rank,
    get_sp_world_size,
)
from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.forward_batch import ForwardBatch
from fastvideo.jobs.options import EngineOptions
from fastvideo.pipelines.builder import model_phases
from fastvideo.pipelines.composed_pipeline_base import ComposedPipelineBase
from fastvideo.pipelines.phases import Phase, denoise_phase
from fastvideo.storage import (
    ArtifactStore,
    CheckpointRef,
    CorruptInputError,
    delete_checkpoint,
    load_valid_checkpoint,
    open_store,
    read_inputs,
    retry_io,
    write_checkpoint,
    write_encoded,
)
from fastvideo.storage.batch_codec import (
    EncodedBatch,
    decode_batch,
    encode_batch,
    snapshot_fields,
)

logger = logging.getLogger(__name__)

REPLICA_WAIT = timedelta(days=2)
"""How long replicas that finished their items wait for the others (a shard's worth)."""
_PROGRESS_STATE = ("step_index", "extra")
"""Saved with the denoise phase's fields: where the loop is and the scheduler's state."""

ProgressCallback = Callable[[str, int, int], None]
"""Called as `(item_id, step, total)` after every denoising step."""


@dataclass(frozen=True)
class DenoiseItem:
    item_id: str
    inputs: tuple[CheckpointRef, ...]
    """Read in this order into one batch (later checkpoints overwrite the fields they hold)."""
    output_key: str
    progress_key: str
    input_producers: tuple[str, ...] = ()
    """The phase that wrote each input: a missing or corrupt input names it."""

    def producer_of(self, key: str) -> str:
        for ref, producer in zip(self.inputs, self.input_producers):
            if ref.key == key:
                return producer
        return key


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
    options: EngineOptions = EngineOptions()
    """The run's attention, STA, compile and guidance-batching settings."""

    def __post_init__(self) -> None:
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if isinstance(self.options, dict):  # read back from JSON
            object.__setattr__(self, "options", EngineOptions(**self.options))

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> DenoiseJob:
        doc = json.loads(data)
        items = tuple(
            DenoiseItem(item["item_id"], tuple(CheckpointRef(**ref) for ref in item["inputs"]),
                        item["output_key"], item["progress_key"],
                        tuple(item.get("input_producers", ())))
            for item in doc.pop("items"))
        return cls(items=items, **doc)

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.to_json()).hexdigest()

    def engine_args(self, world_size: int = 1, local_rank: int = 0,
                    sp_size: int | None = None) -> FastVideoArgs:
        """The engine settings; over `world_size` processes the DiT runs sequence parallel
        over `sp_size` of them (default: all)."""
        device = self.device or FastVideoArgs(model_path=self.model_path).device
        if world_size > 1 and device.startswith("cuda"):
            device = f"cuda:{local_rank}"  # a GPU per process
        return self.options.to_args(self.model_path, device, self.dtype, num_gpus=world_size,
                                    sp_size=sp_size or world_size, tp_size=1)


@dataclass(frozen=True)
class DenoiseOutcome:
    item_id: str
    ref: CheckpointRef | None = None
    error: str | None = None
    corrupt_input: str | None = None
    """The phase whose output (an input here) was missing or corrupt, when that was the
    error."""
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


def run_denoise_job(job: DenoiseJob, pipeline: ComposedPipelineBase | None = None,
                    on_progress: ProgressCallback | None = None,
                    group: GroupCoordinator | None = None) -> list[DenoiseOutcome]:
    """Denoise every item of `job` with one pipeline (loaded here unless given).

    With `group` (the world of a multi-process job, its sp groups set up) every rank calls
    this with the same job; each replica (sp group) denoises its share of the items (see
    the module doc), and rank 0 returns every outcome in the job's order, the other ranks
    [].
    """
    world_size = group.world_size if group is not None else 1
    rank = group.rank_in_group if group is not None else 0
    sp_size = get_sp_world_size() if group is not None else 1
    num_replicas = world_size // sp_size
    leader = get_sp_rank() == 0 if group is not None else True
    args = job.engine_args(world_size, int(os.environ.get("LOCAL_RANK", rank)), sp_size)
    phase = job_phase(job.model_path)
    if pipeline is None:
        from fastvideo.pipelines.builder import build_pipeline_for_stages

        pipeline = build_pipeline_for_stages(args, phase.stages)
    runner = ItemRunner(store=open_store(job.store_uri) if leader else None,
                         stage=denoise_stage(pipeline, phase), phase=phase, args=args,
                         checkpoint_every=job.checkpoint_every, on_progress=on_progress,
                         group=get_sp_group() if sp_size > 1 else None)
    replica = rank // sp_size
    mine = [runner.run(item) for item in job.items[replica::num_replicas]]
    if num_replicas == 1:
        return mine if rank == 0 else []
    if leader:  # say which replica made each item, for the record
        mine = [dataclasses.replace(o, info={**o.info, "replica": replica}) for o in mine]
    # Every replica's outcomes to rank 0, in job order (item i was replica i % R's). A
    # replica may finish an item's worth of time before another: wait on the CPU, on a
    # group whose timeout is long enough for that, not on the device's.
    sent = DenoiseOutcome.list_to_json(mine) if leader else b""
    gathered = _gather_bytes(dist.new_group(backend="gloo", timeout=REPLICA_WAIT), sent)
    if rank != 0:
        return []
    per_replica = [DenoiseOutcome.list_from_json(gathered[r * sp_size])
                   for r in range(num_replicas)]
    return [per_replica[i % num_replicas][i // num_replicas] for i in range(len(job.items))]


@dataclass(frozen=True)
class Denoised:
    """An item's denoised batch, not yet written."""

    batch: ForwardBatch
    resumed_from: int
    seconds: float


@dataclass
class ItemRunner:
    """Denoises one item at a time; with a `group`, rank 0 holds the store and leads."""

    store: ArtifactStore | None
    stage: Any
    phase: Phase
    args: FastVideoArgs
    checkpoint_every: int
    on_progress: ProgressCallback | None
    group: GroupCoordinator | None
    uploads: Executor | None = None
    """Where progress checkpoints are uploaded (None: in the loop, before the next step)."""
    _pending: dict[str, list[Future]] = field(default_factory=dict)

    @property
    def progress_fields(self) -> tuple[str, ...]:
        return (*self.phase.writes, *_PROGRESS_STATE)

    @property
    def leads(self) -> bool:
        return self.store is not None

    def run(self, item: DenoiseItem) -> DenoiseOutcome | None:
        """The item's outcome on rank 0 (None on the others)."""
        computed = self.compute(item)
        if not isinstance(computed, Denoised):
            return computed
        return self.finish(item, computed) if self.leads else None

    def compute(self, item: DenoiseItem) -> DenoiseOutcome | Denoised | None:
        """Denoise the item without writing its output: the finished batch, or the
        outcome of an item with nothing to compute (skipped, failed; None off rank 0)."""
        plan = self._plan(item) if self.leads else None
        batch = plan if isinstance(plan, ForwardBatch) else None
        if self.group is not None:
            batch = _broadcast_batch(self.group, batch)
        if batch is None:
            return plan
        resumed_from = batch.step_index
        if resumed_from and self.leads:
            logger.info("item %s: resuming denoising at step %d/%d", item.item_id,
                        resumed_from, batch.num_inference_steps)
        self.stage.on_step_end = self._step_callback(item) if self.leads else None
        try:
            with torch.no_grad():
                batch = self.stage(batch, self.args)
        except Exception as exc:
            if self.group is not None:
                raise  # the ranks may be out of step now: end the job (see the module doc)
            logger.exception("item %s: denoising failed", item.item_id)
            return DenoiseOutcome(item.item_id, error=f"{type(exc).__name__}: {exc}")
        finally:
            self.stage.on_step_end = None
        return Denoised(batch, resumed_from, batch.timings[self.stage.name])

    def _plan(self, item: DenoiseItem) -> DenoiseOutcome | ForwardBatch:
        """The outcome of an item with nothing to compute, or the batch to denoise."""
        try:
            done = load_valid_checkpoint(self.store, item.output_key)
            if done is not None:
                return DenoiseOutcome(item.item_id, ref=done[0], skipped=True)
            batch = read_inputs(self.store, item.inputs)
            progress = load_valid_checkpoint(self.store, item.progress_key)
            if progress is not None:
                for name in self.progress_fields:
                    setattr(batch, name, getattr(progress[1], name))
            return batch
        except CorruptInputError as exc:
            producer = item.producer_of(exc.key)
            return DenoiseOutcome(item.item_id, error=f"input from {producer} unreadable: {exc}",
                                  corrupt_input=producer)
        except Exception as exc:  # one item's failure must not stop the shard
            logger.exception("item %s: reading its checkpoints failed", item.item_id)
            return DenoiseOutcome(item.item_id, error=f"{type(exc).__name__}: {exc}")

    def _step_callback(self, item: DenoiseItem) -> Callable[[ForwardBatch, int, int], None]:
        def on_step_end(batch: ForwardBatch, step: int, total: int) -> None:
            if step % self.checkpoint_every == 0 and step < total:
                self._save_progress(item, batch, step)
            if self.on_progress is not None:
                self.on_progress(item.item_id, step, total)
        return on_step_end

    def _save_progress(self, item: DenoiseItem, batch: ForwardBatch, step: int) -> None:
        # A snapshot (device tensors copied without waiting), encoded and uploaded on the
        # uploads thread: the loop goes on and the GPU never idles for a checkpoint.
        snapshot, ready = snapshot_fields(batch, self.progress_fields)

        def save() -> None:
            try:
                ready()
                encoded = encode_batch(snapshot, self.progress_fields)
                retry_io(lambda: write_encoded(self.store, item.progress_key, encoded))
            except Exception:  # progress only saves work; carry on without it
                logger.exception("item %s: saving progress at step %d failed",
                                 item.item_id, step)

        if self.uploads is None:
            save()
        else:
            self._pending.setdefault(item.item_id, []).append(self.uploads.submit(save))

    def finish(self, item: DenoiseItem, denoised: Denoised) -> DenoiseOutcome:
        """Write the item's output checkpoint, then drop its progress checkpoint."""
        try:
            ref = retry_io(lambda: write_checkpoint(
                self.store, item.output_key, denoised.batch,
                (*ForwardBatch.request_field_names(), *self.phase.writes)))
            for upload in self._pending.pop(item.item_id, []):
                upload.result()  # a late progress write must not outlive the delete
            delete_checkpoint(self.store, item.progress_key)
        except Exception as exc:
            logger.exception("item %s: writing its output failed", item.item_id)
            return DenoiseOutcome(item.item_id, error=f"{type(exc).__name__}: {exc}")
        return DenoiseOutcome(item.item_id, ref=ref, seconds=denoised.seconds,
                              resumed_from_step=denoised.resumed_from)


def job_phase(model_path: str) -> Phase:
    """The denoise phase of the model's pipeline."""
    return denoise_phase(model_phases(model_path))


def denoise_stage(pipeline: ComposedPipelineBase, phase: Phase) -> Any:
    """The stage that runs the denoise phase's loop (its one stage)."""
    if len(phase.stages) != 1:
        raise ValueError(f"the denoise phase {phase.name!r} must be one stage (the loop), "
                         f"got {list(phase.stages)}")
    return pipeline.get_stage(phase.stages[0])


def broadcast_bytes(group: GroupCoordinator, data: bytes | None) -> bytes | None:
    """Rank 0's `data` (None stays None) on every rank: its size, then its bytes."""
    size = torch.tensor([-1 if data is None else len(data)], dtype=torch.int64)
    size = group.broadcast(size.to(group.device), src=0).item()
    if size <= 0:
        return None if size < 0 else b""
    buffer = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if data is not None
              else torch.empty(size, dtype=torch.uint8))
    return group.broadcast(buffer.to(group.device), src=0).cpu().numpy().tobytes()


def _gather_bytes(group: dist.ProcessGroup, data: bytes) -> list[bytes]:
    """Every rank's `data`, in rank order, on every rank (a CPU group)."""
    num_ranks = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(num_ranks)]
    dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64), group=group)
    longest = max(max(int(size) for size in sizes), 1)
    buffer = torch.zeros(longest, dtype=torch.uint8)
    if data:
        buffer[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    parts = [torch.empty(longest, dtype=torch.uint8) for _ in range(num_ranks)]
    dist.all_gather(parts, buffer, group=group)
    return [part[:int(size)].numpy().tobytes() for part, size in zip(parts, sizes)]


def _broadcast_batch(group: GroupCoordinator, batch: ForwardBatch | None) -> ForwardBatch | None:
    """Rank 0's batch (None: nothing to run) on every rank, in the checkpoint encoding."""
    encoded = encode_batch(batch) if batch is not None else None
    tensors = broadcast_bytes(group, encoded.tensors if encoded else None)
    if tensors is None:
        return None
    fields = broadcast_bytes(group, encoded.fields if encoded else None)
    if group.rank_in_group == 0:
        return batch
    return decode_batch(EncodedBatch(tensors, fields))


def result_key(job_key: str) -> str:
    """Where the outcomes of the job stored under `job_key` go."""
    return f"{job_key.rsplit('/', 1)[0]}/result.json"
