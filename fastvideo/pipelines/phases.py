"""Phases: how a pipeline's stages group into units of batch work.

A pipeline runs its stages in one call; a batch system runs them as a few *phases*, each
a separate unit (a Prefect task, a lane of a warm worker) whose output is checkpointed,
so a failed run resumes at the phase where it stopped. A pipeline declares its phases in
order (`ComposedPipelineBase.phases`), and everything that moves work around (tasks,
flows, checkpoint keys, the manifest, the training parquet, the denoise job) derives from
that declaration: nothing outside the pipeline names a stage or a batch field.

A phase's checkpoint holds the request fields (so it says what it was made for) and the
fields it writes. Its inputs are the checkpoints of the latest earlier phases that wrote
the fields it reads; its key derives from the request fields it depends on and its
inputs' digests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class SharedNegative:
    """The run's negative prompt goes through the phase's stages once, as a prompt, and
    every item that uses it gets that output field (`output`) as its `into` field."""

    output: str = "prompt_embeds"
    into: str = "negative_prompt_embeds"


@dataclass(frozen=True)
class Phase:
    """Consecutive stages that run, and are checkpointed, as one unit."""

    name: str
    """Names the phase's tasks and its checkpoint folder, e.g. `"encode-text"`."""
    stages: tuple[str, ...]
    """The pipeline stages it runs, in order."""
    writes: tuple[str, ...]
    """`ForwardBatch` fields its checkpoint keeps besides the request."""
    modules: tuple[str, ...] = ()
    """The pipeline modules its stages use (checked when the pipeline is built): a process
    running only this phase loads only these, and engine options about a module (the
    VAE's dtype) enter the keys of the phases that use it."""
    reads: tuple[str, ...] = ()
    """Fields it takes from earlier phases' checkpoints."""
    request: tuple[str, ...] | None = None
    """Request fields its output depends on (they enter its key); None: all of them."""
    file_fields: tuple[str, ...] = ()
    """Request fields naming a file (the image of image-to-video): the file's content
    digest enters the key, so a file changed under the same name is not mistaken for
    the old one."""
    optional_writes: tuple[str, ...] = ()
    """Fields it keeps when they are set (e.g. an item's own negative prompt embedding)."""
    training: tuple[str, ...] = ()
    """Of its fields, those the training parquet takes."""
    denoise: bool = False
    """The resumable loop: it runs as a denoise job (progress checkpoints, sequence
    parallel ranks, replicas, a GPU node), one per pipeline."""
    frames: str | None = None
    """The field holding the video's frames in [0, 1]: stored as uint8 (what a video
    holds, 4x smaller), and what the video is written from. The last phase has one."""
    shared_negative: SharedNegative | None = None
    """This phase also encodes the run's negative prompt, once per run."""

    def __post_init__(self) -> None:
        for name in ("stages", "writes", "modules", "reads", "file_fields", "optional_writes",
                     "training"):
            if isinstance(getattr(self, name), str):
                raise TypeError(f"Phase.{name} must be a tuple of names, got a string")
        if not self.stages:
            raise ValueError(f"phase {self.name!r} has no stages")

    @property
    def column(self) -> str:
        """Its manifest columns' stem: `encode-text` -> `encode_text`."""
        return self.name.replace("-", "_")

    def fields(self) -> tuple[str, ...]:
        return (*self.writes, *self.optional_writes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Phase:
        doc = dict(doc)
        shared = doc.pop("shared_negative", None)
        tuples = {k: tuple(v) for k, v in doc.items() if isinstance(v, list)}
        return cls(**{**doc, **tuples},
                   shared_negative=SharedNegative(**shared) if shared else None)


def producers(phases: Sequence[Phase], index: int) -> tuple[Phase, ...]:
    """The earlier phases whose checkpoints phase `index` reads, in phase order: for each
    field it reads, the latest earlier phase that writes it."""
    found: dict[str, Phase] = {}
    for name in phases[index].reads:
        writer = next((p for p in reversed(phases[:index]) if name in p.fields()), None)
        if writer is None:
            raise ValueError(f"phase {phases[index].name!r} reads {name!r}, which no earlier "
                             f"phase writes (phases: {[p.name for p in phases]})")
        found[writer.name] = writer
    return tuple(p for p in phases if p.name in found)


def check_phases(phases: Sequence[Phase], stage_names: Sequence[str], owner: str) -> None:
    """Raise ValueError unless `phases` cover `stage_names` in order, each stage once,
    with unique names, every read produced earlier, one denoise phase and frames last."""
    names = [p.name for p in phases]
    if len(set(names)) != len(names):
        raise ValueError(f"{owner}: phase names repeat: {names}")
    covered = [stage for p in phases for stage in p.stages]
    if covered != list(stage_names):
        raise ValueError(f"{owner}: its phases run stages {covered}, but its stages are "
                         f"{list(stage_names)}; every stage belongs to one phase, in order")
    for i in range(len(phases)):
        producers(phases, i)
    if sum(p.denoise for p in phases) != 1:
        raise ValueError(f"{owner}: exactly one phase must be the denoise phase, got "
                         f"{[p.name for p in phases if p.denoise]}")
    if not phases[-1].frames:
        raise ValueError(f"{owner}: the last phase ({phases[-1].name!r}) must name its "
                         "frames field (Phase.frames)")


def phase_named(phases: Sequence[Phase], name: str) -> Phase:
    for phase in phases:
        if phase.name == name:
            return phase
    raise ValueError(f"no phase {name!r}; phases: {[p.name for p in phases]}")


def denoise_phase(phases: Sequence[Phase]) -> Phase:
    return next(p for p in phases if p.denoise)
