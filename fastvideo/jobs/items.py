"""What travels between tasks: item specs, shards, the run context, and per-item results.

All of it is small, frozen and JSON-friendly: Prefect persists these (task results are
the cache), never tensors, which stay in the artifact store.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

from fastvideo.fastvideo_args import SamplingParam
from fastvideo.forward_batch import ForwardBatch
from fastvideo.jobs.options import EngineOptions
from fastvideo.storage import CheckpointRef


@dataclass(frozen=True)
class ItemSpec:
    """One video to make: the prompt and every request option resolved (row value or run
    default). The options are the request schema, `SamplingParam`; read them as
    attributes (`item.seed`)."""

    item_id: str
    prompt: str
    shared_negative: bool
    """True when this item uses the run's negative prompt, whose embedding is computed once."""
    params: SamplingParam
    """Its negative prompt is the text used ('' for none)."""
    row: int | None = None
    """Its row in the dataset (0-based), for the manifest; not part of what it makes."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "params":
            raise AttributeError(name)
        try:
            return getattr(self.params, name)
        except AttributeError:
            raise AttributeError(f"ItemSpec has no attribute {name!r}") from None

    def request(self) -> dict[str, Any]:
        """The request fields (`ForwardBatch.request_field_names` minus the request id)."""
        return {"prompt": self.prompt, **asdict(self.params)}

    def to_batch(self, batch: ForwardBatch | None = None) -> ForwardBatch:
        """`batch` (default a new one) with this item's request set."""
        batch = batch if batch is not None else ForwardBatch()
        for name, value in self.request().items():
            setattr(batch, name, [value] if name in ForwardBatch.list_field_names() else value)
        batch.request_id = self.item_id
        return batch


@dataclass(frozen=True)
class Shard:
    """The unit of one task run: a few items that share a model load."""

    index: int
    items: tuple[ItemSpec, ...]

    def label(self, stage: str) -> str:
        """Task run name: the stage, the shard, and the item for shards of one."""
        name = f"{stage}-shard-{self.index:05d}"
        return f"{name}-{self.items[0].item_id}" if len(self.items) == 1 else name


@dataclass(frozen=True)
class RunContext:
    """What every stage of a run shares; part of every task's cache key."""

    model_path: str
    model_fingerprint: str | None
    """None when the run's own machine cannot see the model: the process that runs the
    stages fingerprints it (`fastvideo.jobs.engine.Engine.with_fingerprint`)."""
    store_uri: str
    """Checkpoints go here (`checkpoints/<stage>/<key>`)."""
    output_uri: str
    """Videos go to `<output_uri>/videos/`."""
    device: str
    dtype: str
    """Engine device and dtype of the stages this process runs (text, latents, decode)."""
    denoise_device: str
    denoise_dtype: str
    """Where denoising runs: the GPU node's device when it is dispatched to a deployment."""
    negative_prompt: str
    """The run's shared negative prompt."""
    max_sequence_length: int
    checkpoint_every: int = 5
    """Denoising saves latents + scheduler state every this many steps."""
    fps: int = 16
    options: EngineOptions = EngineOptions()
    """Attention, STA, compile, guidance batching, VAE dtype: the same in every process."""
    training_data: bool = False
    """Also write each shard's training parquet part (`fastvideo.jobs.training_data`)."""


@dataclass(frozen=True)
class ItemResult:
    """One item after one stage: a reference to its output, or why there is none."""

    item_id: str
    ref: CheckpointRef | None = None
    error: str | None = None
    failed_stage: str | None = None
    """The stage where the item failed (an earlier one when the failure was passed on)."""
    corrupt_input: str | None = None
    """Key of an input checkpoint found missing or corrupt: its producer must redo it."""
    seconds: float = 0.0
    """Engine time of the stage for this item (0 when its output was reused)."""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


def failure(item_id: str, stage: str, error: str, corrupt_input: str | None = None) -> ItemResult:
    return ItemResult(item_id, error=error, failed_stage=stage, corrupt_input=corrupt_input)


def combined_digest(refs: list[CheckpointRef]) -> str:
    """One digest for several input checkpoints (their digests in order)."""
    return hashlib.sha256("|".join(r.digest for r in refs).encode()).hexdigest()


def to_jsonable(value: Any) -> Any:
    """Dataclasses to dicts, tuples to lists, recursively (for cache keys and artifacts)."""
    if hasattr(value, "__dataclass_fields__"):
        return to_jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


def item_from_dict(doc: dict[str, Any]) -> ItemSpec:
    return ItemSpec(**{**doc, "params": SamplingParam(**doc["params"])})


def shard_from_dict(doc: dict[str, Any]) -> Shard:
    return Shard(index=doc["index"], items=tuple(item_from_dict(item) for item in doc["items"]))


def run_context_from_dict(doc: dict[str, Any]) -> RunContext:
    return RunContext(**{**doc, "options": EngineOptions(**doc["options"])})


def item_result_from_dict(doc: dict[str, Any]) -> ItemResult:
    ref = doc.get("ref")
    return ItemResult(**{**doc, "ref": CheckpointRef(**ref) if ref else None})
