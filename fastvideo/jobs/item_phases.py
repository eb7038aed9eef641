"""What each phase does for one item: its checkpoint key, its inputs, its engine call.

Shared by the Prefect tasks (one phase over a shard, in the flow's process) and the warm
worker (every phase of a shard, on the GPU node), so both compute the same keys and the
same outputs, for any pipeline: everything here follows the pipeline's declared phases
(`fastvideo.pipelines.phases`). A key derives from the model fingerprint, the phase, the
request fields it depends on, the engine options that change its result, the engine's
device kind and dtype, and the input digests (`fastvideo.storage.checkpoint_key`). An
output already in the store that verifies is reused.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastvideo.fastvideo_args import NEUTRAL_OPTIONS
from fastvideo.forward_batch import ForwardBatch
from fastvideo.jobs.denoise import DenoiseItem, DenoiseOutcome
from fastvideo.jobs.engine import ENGINE
from fastvideo.jobs.items import ItemResult, ItemSpec, RunContext, combined_digest, failure
from fastvideo.jobs.video_stream import StreamedVideo
from fastvideo.pipelines.builder import model_phases, pipeline_class
from fastvideo.pipelines.phases import Phase, producers
from fastvideo.pipelines.stages.decoding import frames_as_uint8
from fastvideo.storage import (
    ArtifactStore,
    CheckpointRef,
    CorruptInputError,
    StoreUnavailableError,
    checkpoint_key,
    load_valid_checkpoint,
    read_inputs,
    retry_io,
    write_checkpoint,
)
from fastvideo.storage.file_digests import file_sha256
from fastvideo.storage.uri import read_uri
from fastvideo.utils.video_io import to_uint8, video_file_name, write_mp4

ENCODE_NEGATIVE = "encode-negative"
"""The run's shared negative prompt, encoded once (by the phase with `shared_negative`)."""
WRITE_VIDEO = "write-video"
"""After the phases: the mp4 of the last phase's frames."""
PROGRESS_SUFFIX = "-progress"


@dataclass(frozen=True)
class PhaseInput:
    """A checkpoint a phase reads, and the phase (or `encode-negative`) that wrote it."""

    producer: str
    ref: CheckpointRef


class PhaseInputError(Exception):
    """An input checkpoint is missing or corrupt; `producer` must make it again."""

    def __init__(self, producer: str, cause: CorruptInputError) -> None:
        super().__init__(f"input from {producer} unreadable: {cause}")
        self.producer, self.key = producer, cause.key


def phases_of(ctx: RunContext) -> tuple[Phase, ...]:
    return model_phases(ctx.model_path)


def stage_names(phases: Sequence[Phase]) -> tuple[str, ...]:
    """Every step of an item, in order: the phases, then writing the video."""
    return (*(p.name for p in phases), WRITE_VIDEO)


def stage_key(ctx: RunContext, phase: Phase | str, params: dict[str, Any],
              input_digest: str | None = None, engine: tuple[str, str] | None = None) -> str:
    """The checkpoint key of a phase's output (or of `encode-negative`, by name); the
    engine's device kind and dtype count (`engine`: the phase's own (device, dtype), when
    it is not the run's), and so do the engine options that change this phase's result."""
    assert ctx.model_fingerprint is not None, "fingerprint the model first (with_fingerprint)"
    device, dtype = engine or (ctx.device, ctx.dtype)
    name = phase if isinstance(phase, str) else phase.name
    engine_params = {"device": device.split(":")[0], "dtype": dtype,
                     **ctx.options.phase_params(None if isinstance(phase, str) else phase)}
    return checkpoint_key(model_fingerprint=ctx.model_fingerprint, stage=name,
                          params={**params, "engine": engine_params}, input_digest=input_digest)


def uses_shared_negative(item: ItemSpec) -> bool:
    return item.shared_negative and item.to_batch().do_classifier_free_guidance


def phase_inputs(phases: Sequence[Phase], index: int, results: Mapping[str, ItemResult],
                 item: ItemSpec, negative: ItemResult | None) -> list[PhaseInput]:
    """The checkpoints phase `index` reads for `item`, in order (later ones overwrite the
    fields they share): its producers' outputs, then the run's negative embedding when
    the item uses it and the phase reads it."""
    phase = phases[index]
    inputs = [PhaseInput(p.name, results[p.name].ref) for p in producers(phases, index)]
    shared = next((p.shared_negative for p in phases[:index] if p.shared_negative), None)
    if shared is not None and shared.into in phase.reads and uses_shared_negative(item):
        if negative is None or not negative.ok:
            raise ValueError("the run's negative prompt embedding is missing: "
                             f"{negative.error if negative else 'not computed'}")
        inputs.append(PhaseInput(ENCODE_NEGATIVE, negative.ref))
    return inputs


def read_phase_inputs(store: ArtifactStore, inputs: Sequence[PhaseInput]) -> ForwardBatch:
    """The inputs as one batch; a missing or corrupt one raises `PhaseInputError`."""
    batch = ForwardBatch()
    for entry in inputs:
        try:
            read_inputs(store, [entry.ref], batch)
        except CorruptInputError as exc:
            raise PhaseInputError(entry.producer, exc) from exc
    return batch


def checkpointed(store: ArtifactStore, key: str, item_id: str,
                 fields: Sequence[str] | Callable[[ForwardBatch], Sequence[str]],
                 compute: Callable[[], tuple[ForwardBatch, float]],
                 keep: dict[str, ForwardBatch] | None = None) -> ItemResult:
    """Reuse the checkpoint under `key` if it verifies, else `compute()` and write its
    `fields` (or `fields(batch)`: those only the computation tells). `keep["batch"]`
    receives the batch (computed or read), for a caller that uses it next."""
    existing = load_valid_checkpoint(store, key)
    if existing is not None:
        if keep is not None:
            keep["batch"] = existing[1]
        return ItemResult(item_id, ref=existing[0], info={"reused": True})
    batch, seconds = compute()
    if keep is not None:
        keep["batch"] = batch
    names = fields(batch) if callable(fields) else fields
    start = time.perf_counter()
    ref = retry_io(lambda: write_checkpoint(store, key, batch, names))
    return ItemResult(item_id, ref=ref, seconds=seconds,
                      info={"write_s": round(time.perf_counter() - start, 4)})


def _timed(ctx: RunContext, stages: Sequence[str], batch: ForwardBatch
           ) -> tuple[ForwardBatch, float]:
    batch = ENGINE.run_stages(ctx, stages, batch)
    return batch, sum(batch.timings.get(name, 0.0) for name in stages)


def encode_negative(ctx: RunContext, store: ArtifactStore, phases: Sequence[Phase]
                    ) -> ItemResult:
    """Encode the run's negative prompt once, as a prompt without guidance, with the
    stages of the phase that declares `shared_negative`; items that use it share this."""
    phase = next(p for p in phases if p.shared_negative)
    shared = phase.shared_negative
    request = {"prompt": [ctx.negative_prompt], "guidance_scale": 1.0,
               "max_sequence_length": ctx.max_sequence_length}
    key = stage_key(ctx, ENCODE_NEGATIVE, {"negative_prompt": ctx.negative_prompt,
                                           "max_sequence_length": ctx.max_sequence_length,
                                           "stages": list(phase.stages)})

    def compute() -> tuple[ForwardBatch, float]:
        batch, seconds = _timed(ctx, phase.stages, ForwardBatch(**request))
        out = ForwardBatch(negative_prompt=[ctx.negative_prompt],
                           max_sequence_length=ctx.max_sequence_length)
        setattr(out, shared.into, getattr(batch, shared.output))
        return out, seconds

    return checkpointed(store, key, "negative",
                        ("negative_prompt", "max_sequence_length", shared.into), compute)


class NegativeEmbedding:
    """The run's shared negative embedding, read from the store once per shard."""

    def __init__(self, store: ArtifactStore, result: ItemResult | None) -> None:
        self.store, self.result = store, result
        self._batch: ForwardBatch | None = None

    def get(self, field: str) -> torch.Tensor:
        if self.result is None or not self.result.ok:
            raise ValueError(f"the run's negative prompt embedding is missing: "
                             f"{self.result.error if self.result else 'not computed'}")
        if self._batch is None:
            try:
                self._batch = read_inputs(self.store, [self.result.ref])
            except CorruptInputError as exc:
                raise PhaseInputError(ENCODE_NEGATIVE, exc) from exc
        return getattr(self._batch, field)


def _request_params(phase: Phase, item: ItemSpec) -> dict[str, Any]:
    request = item.request()
    names = list(request) if phase.request is None else list(phase.request)
    if phase.shared_negative and uses_shared_negative(item):
        names = [n for n in names if n != "negative_prompt"]  # the shared one is an input
    params = {name: request[name] for name in names
              if name not in NEUTRAL_OPTIONS or request[name] != NEUTRAL_OPTIONS[name]}
    for name in phase.file_fields:
        if request.get(name) is not None:
            params[f"{name}_sha256"] = file_digest(request[name])
    return params


def file_digest(name: str) -> str:
    """sha256 of a local file or a store object (`s3://bucket/key`); FileNotFoundError
    names a missing one."""
    if "://" not in name:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"file {name} does not exist")
        return file_sha256(path)  # remembered per file version: no re-read of a large file
    return hashlib.sha256(read_uri(name)).hexdigest()


def run_phase(ctx: RunContext, store: ArtifactStore, phase: Phase, item: ItemSpec,
              inputs: Sequence[PhaseInput], negative: NegativeEmbedding | None = None,
              batch: ForwardBatch | None = None,
              keep: dict[str, ForwardBatch] | None = None) -> ItemResult:
    """Run one (non-denoise) phase for `item`, or reuse its verified checkpoint. `batch`:
    its inputs already in memory (else they are read); `keep["batch"]`: its output."""
    if phase is phases_of(ctx)[0]:  # the model must take what the request gives
        pipeline_class(ctx.model_path).check_image_given(item.image, f"item {item.item_id!r}")
    params = _request_params(phase, item)
    if phase.frames:
        params["frames"] = "uint8"
    key = stage_key(ctx, phase, params,
                    combined_digest([i.ref for i in inputs]) if inputs else None)
    shared = phase.shared_negative if phase.shared_negative and uses_shared_negative(item) \
        else None
    def compute() -> tuple[ForwardBatch, float]:
        start = batch if batch is not None else read_phase_inputs(store, inputs)
        start = item.to_batch(start)
        if shared is not None:  # the stage keeps it and encodes no more
            setattr(start, shared.into, negative.get(shared.into))
        # Frames rounded on the device when the stage can (the same values either way).
        with frames_as_uint8() if phase.frames else nullcontext():
            out, seconds = _timed(ctx, phase.stages, start)
        if phase.frames:  # the rounding `write_mp4` applies, so the video is unchanged
            frames = getattr(out, phase.frames)
            setattr(out, phase.frames, to_uint8(frames))
        return out, seconds

    def fields(out: ForwardBatch) -> list[str]:
        optional = [name for name in phase.optional_writes
                    if getattr(out, name, None) is not None
                    and (shared is None or name != shared.into)]
        return [*ForwardBatch.request_field_names(), *phase.writes, *optional]

    return checkpointed(store, key, item.item_id, fields, compute, keep)


def denoise_item(ctx: RunContext, phase: Phase, item_id: str, inputs: Sequence[PhaseInput]
                 ) -> DenoiseItem:
    """The denoise job entry of an item: where its output and its progress go."""
    refs = [i.ref for i in inputs]
    output_key = stage_key(ctx, phase, {}, combined_digest(refs),
                           engine=(ctx.denoise_device, ctx.denoise_dtype))
    # The same hash under another folder: the progress of exactly that output.
    progress_key = output_key.replace(f"/{phase.name}/", f"/{phase.name}{PROGRESS_SUFFIX}/", 1)
    return DenoiseItem(item_id=item_id, inputs=tuple(refs), output_key=output_key,
                       progress_key=progress_key,
                       input_producers=tuple(i.producer for i in inputs))


def denoise_result(phase: Phase, outcome: DenoiseOutcome) -> ItemResult:
    """An item's denoise outcome as its phase result."""
    if outcome.error is not None:
        return failure(outcome.item_id, phase.name, outcome.error, outcome.corrupt_input)
    return ItemResult(outcome.item_id, ref=outcome.ref, seconds=outcome.seconds,
                      info={"reused": outcome.skipped,
                            "resumed_from_step": outcome.resumed_from_step})


# An id used as it is in a file name: letters, digits, '.', '_', '-', not leading with
# '.' or '-' (hidden files, command-line options), short enough for any file system.
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def safe_name(item_id: str) -> str:
    """The item id as a file name part: the id itself when it is safe, else a readable
    prefix, `~` and a digest of the whole id. `~` never occurs in a safe id, so two ids
    never get one name (`a/b` -> `a-b~<digest>`, `a-b` -> `a-b`)."""
    if _SAFE_ID.fullmatch(item_id):
        return item_id
    prefix = re.sub(r"[^A-Za-z0-9._-]+", "-", item_id).strip("-.")[:40].rstrip("-.")
    return f"{prefix or 'item'}~{hashlib.sha256(item_id.encode()).hexdigest()[:16]}"


def video_key(item: ItemSpec) -> str:
    """`videos/<safe id>_<prompt slug>_seed<seed>.mp4`; the slug holds no `_`, so the name
    tells the id back and two items never share a file."""
    return f"videos/{safe_name(item.item_id)}_{video_file_name(item.prompt, item.seed)}"


def write_video(ctx: RunContext, store: ArtifactStore, output: ArtifactStore, item: ItemSpec,
                last: Phase, decoded: CheckpointRef, frames: torch.Tensor | None = None,
                streamed: StreamedVideo | None = None) -> ItemResult:
    """Encode the item's frames (the last phase's, uint8: `frames` when given, the ones
    its checkpoint `decoded` holds otherwise) as mp4 under `<output>/videos/`, or take the
    mp4 `streamed` encoded of exactly those frames during decoding; the ref holds its
    sha256."""
    start = time.perf_counter()
    encoded = streamed.finish(frames) if streamed is not None else None
    if frames is None and encoded is None:
        try:
            frames = getattr(read_inputs(store, [decoded]), last.frames)
        except CorruptInputError as exc:
            raise PhaseInputError(last.name, exc) from exc
    key = video_key(item)
    with tempfile.TemporaryDirectory() as tmp:
        path = encoded or write_mp4(frames[0], Path(tmp) / "video.mp4", fps=ctx.fps)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        retry_io(lambda: output.put_file(key, path))
    return ItemResult(item.item_id, ref=CheckpointRef(output.root_uri, key, digest),
                      seconds=time.perf_counter() - start)


def guarded(stage: str, item_id: str, work: Callable[[], ItemResult], log: Any,
            raise_unavailable: bool = False) -> ItemResult:
    """`work()`, or the item's failure in `stage` (one item's failure stops no other): a
    missing or corrupt input names the phase that must make it again. A store that went
    away fails the item too, unless `raise_unavailable` (a Prefect task retries then)."""
    try:
        return work()
    except StoreUnavailableError as exc:
        if raise_unavailable:
            raise
        log.error("%s item %s: store unavailable: %s", stage, item_id, exc)
        return failure(item_id, stage, f"StoreUnavailableError: {exc}")
    except PhaseInputError as exc:
        log.warning("%s item %s: %s", stage, item_id, exc)
        return failure(item_id, stage, str(exc), corrupt_input=exc.producer)
    except Exception as exc:
        # Bad input is the request's fault and needs no traceback; anything else does.
        log.error("%s item %s failed: %s", stage, item_id, exc,
                  exc_info=not isinstance(exc, ValueError))
        return failure(item_id, stage, f"{type(exc).__name__}: {exc}")
