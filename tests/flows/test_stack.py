"""infra/stack.sh on this machine, as an operator runs it: the Prefect server on a private
PostgreSQL cluster, SeaweedFS, prefect.yaml deployed, the resume automation, and process
workers whose GPU pool shares out two GPU slots (FASTVIDEO_GPUS=0,1 on CPUs). A bulk run
of the deployment is SIGKILLed mid-run; the automation resumes it and it completes."""

from __future__ import annotations

import asyncio
import glob
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.flows.helpers import PROMPTS, REPO, TINY, read_manifest, write_dataset

STACK = REPO / "infra" / "stack.sh"
# Offsets from a random base: Prefect, S3, PostgreSQL = SEAWEED_PORT_BASE (its master,
# volume and filer on +1..+3, their gRPC and S3's on +11..+14).
PORT_OFFSETS = (0, 1, 2, 3, 4, 5, 13, 14, 15, 16)


def _postgres_available() -> bool:
    if not (shutil.which("initdb") or glob.glob("/usr/lib/postgresql/*/bin/initdb")):
        return False
    if os.getuid() != 0:
        return True
    try:
        pwd.getpwnam("postgres")  # as root, the stack runs the cluster as this user
        return True
    except KeyError:
        return False


pytestmark = pytest.mark.skipif(not _postgres_available(),
                                reason="needs PostgreSQL (Debian's postgresql package)")


def _free_port_block() -> int:
    """A base port whose PORT_OFFSETS are all free (and below 65536)."""
    for _ in range(100):
        base = random.randrange(20000, 60000)
        sockets = []
        try:
            for offset in PORT_OFFSETS:
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError("no free block of ports")


@dataclass
class Stack:
    state: Path
    env: dict[str, str]
    """The environment stack.sh ran with, plus what `stack.sh env` exports."""

    def run(self, *args: str, timeout: float = 300) -> str:
        done = subprocess.run([str(STACK), *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        assert done.returncode == 0, f"stack.sh {' '.join(args)} failed:\n{done.stdout}\n" \
                                     f"{done.stderr}\n{self.log_tails()}"
        return done.stdout

    def log_tails(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-2000:]}"
                         for log in sorted((self.state / "logs").glob("*.log")))

    def pids(self) -> list[int]:
        return [int(p.read_text()) for p in (self.state / "pids").glob("*")]


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    # Not under pytest's tmp: it is private to root, and the cluster runs as `postgres`.
    state = Path(tempfile.mkdtemp(prefix="fvstack-"))
    state.chmod(0o755)
    base = _free_port_block()
    env = {**os.environ, "FASTVIDEO_STACK_DIR": str(state), "FASTVIDEO_DB": "postgres",
           "PREFECT_PORT": str(base), "S3_PORT": str(base + 1), "PG_PORT": str(base + 2),
           "SEAWEED_PORT_BASE": str(base + 2), "FASTVIDEO_GPUS": "0,1",
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PYTHON": sys.executable}
    env.pop("PREFECT_API_URL", None)
    stack = Stack(state, env)
    try:
        stack.run("start")
        for line in stack.run("env").splitlines():
            name, value = line.removeprefix("export ").split("=", 1)
            env[name] = value
        yield stack
    finally:
        pids = stack.pids() + [int(p.read_text()) for p in (state / "workers").glob("w-*.pid")]
        subprocess.run([str(STACK), "stop"], env=env, capture_output=True, timeout=120)
        left = [pid for pid in pids if _alive(pid)]
        for pid in left:
            os.killpg(pid, signal.SIGKILL)
        postgres_left = (state / "postgres" / "postmaster.pid").exists()
        shutil.rmtree(state, ignore_errors=True)
        assert not left and not postgres_left, f"stack.sh stop left processes {left}"


def _alive(pid: int) -> bool:
    """The process runs (a zombie, exited but not reaped by init, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(") ", 1)[1][0] != "Z"


@pytest.fixture
def stack_api(stack: Stack) -> Iterator[Stack]:
    """This process's Prefect client and boto3 point at the stack."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    keys = [k for k in stack.env if k.startswith("AWS_")]
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: stack.env[k] for k in keys})
    try:
        with temporary_settings({PREFECT_API_URL: stack.env["PREFECT_API_URL"]}):
            yield stack
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_stack_serves_prefect_from_postgres(stack_api: Stack) -> None:
    import asyncpg
    from prefect import get_client

    status = stack_api.run("status")
    assert "database: postgres" in status and "postgres: running" in status, status
    password = (stack_api.state / "postgres-password").read_text().strip()

    async def deployments() -> list[str]:
        conn = await asyncpg.connect(host="127.0.0.1", port=int(stack_api.env["PG_PORT"]),
                                     user="fastvideo", password=password, database="prefect")
        try:
            return sorted(r["name"] for r in await conn.fetch("SELECT name FROM deployment"))
        finally:
            await conn.close()

    # What the API serves is what the cluster holds.
    assert asyncio.run(deployments()) == ["bulk", "generate", "gpu-denoise", "gpu-shard"]
    with get_client(sync_client=True) as client:
        (automation,) = client.read_automations_by_name("fastvideo-resume-crashed-bulk")
        assert automation.enabled
        bulk = client.read_deployment_by_name("bulk/bulk")
        (schedule,) = bulk.schedules
        assert schedule.schedule.timezone and not schedule.active


def test_killed_bulk_run_resumes_on_its_own_with_a_gpu_slot_per_run(
        stack_api: Stack, tiny_wan_path: Path, tmp_path: Path) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.deployments import run_deployment

    dataset = write_dataset(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    output = "s3://fastvideo/resume"
    # Three shards of one, two in flight (plus the look-ahead one): the GPU pool's worker
    # runs two at once, one per GPU slot; the third waits for a free one.
    run = run_deployment("bulk/bulk", timeout=0, parameters=dict(
        dataset=str(dataset), output=output, model_path=str(tiny_wan_path), shard_size=1,
        concurrency=2, device="cpu", enable_torch_compile=False, artifact_key="stack-resume",
        **TINY))
    gpu_runs = DeploymentFilter(name=DeploymentFilterName(any_=["gpu-shard"]))
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 300
        while not any(r.state.is_completed()
                      for r in client.read_flow_runs(deployment_filter=gpu_runs)):
            assert time.monotonic() < deadline, stack_api.log_tails()
            time.sleep(0.5)
        bulk = client.read_flow_run(run.id)
        assert bulk.state.is_running(), bulk.state  # a GPU shard done, the run still going
        os.kill(int(bulk.infrastructure_pid), signal.SIGKILL)

        deadline = time.monotonic() + 300
        while not (bulk := client.read_flow_run(run.id)).state.is_final() or \
                bulk.state.is_crashed():
            assert time.monotonic() < deadline, (bulk.state, stack_api.log_tails())
            time.sleep(1)
        states = [s.name for s in client.read_flow_run_states(run.id)]
        shards = client.read_flow_runs(deployment_filter=gpu_runs)
        slots = {r.id: _slot_of(client, r.id) for r in shards}

    # The same flow run crashed, was put back by the automation and finished.
    assert bulk.state.is_completed() and bulk.run_count == 2, states
    assert states.index("Crashed") < states.index("Resuming") < len(states) - 1
    assert states.count("Crashed") == 1, states
    rows = read_manifest(output)
    assert [r["status"] for r in rows.values()] == ["succeeded"] * 3
    # The resumed run found its GPU runs again (idempotency keys of the same run id):
    # three shards, three GPU runs, none recomputed.
    assert len(shards) == 3 and all(r.state.is_completed() for r in shards)
    # Each GPU run held a slot; runs at the same time held different ones, at most two.
    assert set(slots.values()) == {"0", "1"}, slots
    for a in shards:
        for b in shards:
            if a.id != b.id and a.start_time < b.end_time and b.start_time < a.end_time:
                assert slots[a.id] != slots[b.id], (a.name, b.name, slots)
    # A warm worker per GPU, each seeing only its own.
    workers = subprocess.run(
        [stack_api.env["PYTHON"], "-m", "fastvideo.jobs.worker_client", "list"],
        env=stack_api.env, capture_output=True, text=True, timeout=120).stdout
    assert sorted(line.split("CUDA_VISIBLE_DEVICES=")[1][0] for line in workers.splitlines()
                  if line.startswith("worker ")) == ["0", "1"], workers


def _slot_of(client, flow_run_id) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    (line,) = [log.message for log in logs if log.message.startswith("GPU slot(s) ")]
    return line.split("CUDA_VISIBLE_DEVICES=")[1]
