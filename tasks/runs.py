"""A flow run among the runs over the same output: its name, its artifact key, the run it
continues, and earlier runs a killed process left `Running`.

Prefect cannot see a flow's process die (`kill -9`, a lost node): its run stays `Running`
for ever. So each run of `bulk` or `generate` records, as flow run labels, which process
it is (`fastvideo.process`: this machine's boot and pid namespace, the pid and its start
time, so a reused pid is not mistaken for it) and how often it sends Prefect's heartbeats
(`fastvideo.heartbeat_s`, when `PREFECT_FLOWS_HEARTBEAT_FREQUENCY` is set); and it tags
itself `output:<key>`. The next run over the same output marks an earlier one `Crashed`
when its process is gone from this machine, or, run elsewhere, when its heartbeats stopped
for three intervals. A live run over the same output (two runs at once are safe) is left
alone.
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.runtime import flow_run
from prefect.settings import get_current_settings
from prefect.states import Crashed

from fastvideo.utils.video_io import slug
from tasks.common import run_logger

PROCESS_LABEL = "fastvideo.process"
HOST_LABEL = "fastvideo.host"
HEARTBEAT_LABEL = "fastvideo.heartbeat_s"
OUTPUT_TAG = "output:"
# Heartbeats missed before a run elsewhere counts as gone (Prefect sends them every
# `PREFECT_FLOWS_HEARTBEAT_FREQUENCY` seconds, 30 at least).
MISSED_HEARTBEATS = 3
_ACTIVE = [StateType.RUNNING, StateType.PENDING]


def output_key(output: str) -> str:
    """Lowercase-dashed key of an output: its last path part and a digest of the whole
    URI (`/data/runs/demo` -> `demo-1a2b3c4d`), for artifact keys and the run's tag."""
    uri = output.rstrip("/")
    digest = hashlib.sha256(uri.encode()).hexdigest()[:8]
    return f"{slug(uri.rsplit('/', 1)[-1], 40) or 'output'}-{digest}"


def _name_of(uri: str) -> str:
    """A file's stem or a folder's name, of a path (`.` included) or a URI."""
    name = uri.rstrip("/").rsplit("/", 1)[-1] if "://" in uri else Path(uri).resolve().name
    return slug(Path(name).stem, 40) or "root"


def bulk_run_name() -> str:
    """`bulk-<dataset stem>-to-<output name>`: the bulk flow's `flow_run_name`."""
    parameters = flow_run.parameters
    return f"bulk-{_name_of(parameters['dataset'])}-to-{_name_of(parameters['output'])}"


def generate_run_name() -> str:
    """`generate-<prompt>-to-<output name>`: the generate flow's `flow_run_name`."""
    parameters = flow_run.parameters
    return f"generate-{slug(parameters['prompt'], 32)}-to-{_name_of(parameters['output'])}"


@dataclass(frozen=True)
class RunRef:
    """An earlier flow run, as an operator finds it in the UI."""

    id: UUID
    name: str
    state: str

    def __str__(self) -> str:
        return f"{self.name} ({self.id}, {self.state})"

    def markdown(self) -> str:
        return f"[{self.name}](/runs/flow-run/{self.id}) ({self.state})"


@dataclass
class Lineage:
    """What a run found about earlier runs over its output when it started."""

    continues: RunRef | None = None
    """The latest earlier run over this output that is not running any more."""
    crashed: list[RunRef] = field(default_factory=list)
    """Runs left `Running` or `Pending` by a process that is gone, now marked `Crashed`."""
    running: list[RunRef] = field(default_factory=list)
    """Runs over this output whose process is alive (or cannot be checked from here)."""


def take_over_output(output: str) -> Lineage:
    """Record this flow run's process and output, mark earlier runs over the same output
    whose process is gone `Crashed`, and find the run this one continues (all logged)."""
    with get_client(sync_client=True) as client:
        return find_lineage(client, UUID(flow_run.id), output)


def find_lineage(client: Any, run_id: UUID, output: str, now: datetime | None = None
                 ) -> Lineage:
    """`take_over_output` with an explicit Prefect client and flow run (`now` for tests)."""
    logger = run_logger()
    now = now or datetime.now(timezone.utc)
    me = client.read_flow_run(run_id)
    tag = OUTPUT_TAG + output_key(output)
    client.update_flow_run(run_id, tags=sorted({*me.tags, tag}))
    client.update_flow_run_labels(run_id, process_labels())
    flow = client.read_flow(me.flow_id)
    others = FlowRunFilter(id=FlowRunFilterId(not_any_=[run_id]),
                           tags=FlowRunFilterTags(all_=[tag]))
    by_flow = FlowFilter(name=FlowFilterName(any_=[flow.name]))
    lineage = Lineage()
    active = client.read_flow_runs(flow_filter=by_flow, flow_run_filter=others.model_copy(
        update={"state": FlowRunFilterState(type=FlowRunFilterStateType(any_=_ACTIVE))}))
    for run in active:
        reason = gone_reason(client, run, now)
        if reason is None:
            logger.warning("run %s is also running over this output", _ref(run))
            lineage.running.append(_ref(run))
            continue
        client.set_flow_run_state(run.id, Crashed(
            message=f"{reason}; found by run {me.name} ({me.id})"), force=True)
        logger.warning("marked run %s (%s) Crashed: %s", run.name, run.id, reason)
        lineage.crashed.append(RunRef(run.id, run.name, "Crashed"))
    alive = {r.id for r in lineage.running}
    earlier = client.read_flow_runs(flow_filter=by_flow, flow_run_filter=others,
                                    sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=10)
    lineage.continues = next((_ref(r) for r in earlier
                              if r.id not in alive and r.start_time is not None), None)
    if lineage.continues:
        logger.info("this run continues run %s", lineage.continues)
    return lineage


def _ref(run: FlowRun) -> RunRef:
    return RunRef(run.id, run.name, run.state.name if run.state else "unknown")


def process_labels() -> dict[str, str]:
    """This process's labels: who it is and how often it sends heartbeats."""
    labels = {HOST_LABEL: f"{socket.gethostname()} pid {os.getpid()}"}
    process = process_id(os.getpid())
    if process is not None:
        labels[PROCESS_LABEL] = process
    heartbeat_s = get_current_settings().flows.heartbeat_frequency
    if heartbeat_s is not None:
        labels[HEARTBEAT_LABEL] = str(heartbeat_s)
    return labels


def process_id(pid: int) -> str | None:
    """`<boot id>/<pid namespace>/<pid>/<start time>`: one process, never another (pids
    are reused; containers share host names); None when there is no such process (or no
    /proc to ask)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
        # Field 22 of /proc/<pid>/stat, counted after the command name (which may hold spaces).
        start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None
    return f"{boot}/{namespace}/{pid}/{start}"


def gone_reason(client: Any, run: FlowRun, now: datetime) -> str | None:
    """Why `run`'s process is known to be gone, or None when it may be alive."""
    recorded = run.labels.get(PROCESS_LABEL)
    host = run.labels.get(HOST_LABEL, "an unrecorded process")
    mine = process_id(os.getpid())
    if recorded and mine and recorded.rsplit("/", 2)[0] == mine.rsplit("/", 2)[0]:
        pid = int(recorded.rsplit("/", 2)[1])
        return None if process_id(pid) == recorded else f"its process ({host}) is gone"
    interval = run.labels.get(HEARTBEAT_LABEL)
    if interval is None:
        return None  # elsewhere, without heartbeats: nothing tells it is gone
    last = last_heartbeat(client, run) or run.start_time or run.created
    if last is None or now - last <= timedelta(seconds=MISSED_HEARTBEATS * float(interval)):
        return None
    return (f"its process ({host}) sent no heartbeat since {last.isoformat(timespec='seconds')}"
            f" (every {interval} s expected)")


def last_heartbeat(client: Any, run: FlowRun) -> datetime | None:
    """When Prefect last received a heartbeat of `run`, if ever."""
    page = client.read_events(filter=EventFilter(
        event=EventNameFilter(name=["prefect.flow-run.heartbeat"]),
        resource=EventResourceFilter(id=[f"prefect.flow-run.{run.id}"])), limit=1)
    return page.events[0].occurred if page.events else None
