"""prefect.yaml deployed to a real server, run by process workers, denoising on the GPU pool."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastvideo.jobs.worker_client import WORKER_DIR_ENV, running_workers
from tests.flows.helpers import (
    PROMPTS,
    REPO,
    TINY,
    read_manifest,
    stop_group,
    write_dataset,
)

POOLS = ("fastvideo-cpu", "fastvideo-gpu")


@pytest.fixture
def workers(prefect_server, flow_env: dict[str, str], s3_env, tmp_path: Path
            ) -> Iterator[Path]:
    """Pools, deployments from prefect.yaml, and one process worker per pool; yields the
    folder of the warm workers the GPU pool's runs start (all killed at the end)."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    worker_dir = Path(tempfile.mkdtemp(prefix="fvw-"))
    env = {**flow_env, **s3_env.env(), "FASTVIDEO_CODE_DIR": str(REPO),
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_HEARTBEAT_SECONDS": "5",
           WORKER_DIR_ENV: str(worker_dir)}
    with get_client(sync_client=True) as client:
        for pool in POOLS:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"), overwrite=True)
    subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"],
                   cwd=REPO, env=env, check=True, capture_output=True, timeout=180)
    procs = []
    try:
        for pool in POOLS:
            log = open(tmp_path / f"worker-{pool}.log", "wb")  # noqa: SIM115 - closed below
            procs.append((log, subprocess.Popen(
                [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool,
                 "--type", "process"], cwd=tmp_path, env=env, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)))
        yield worker_dir
    finally:
        for log, proc in procs:
            stop_group(proc)
            log.close()
        for pid in running_workers(worker_dir):
            os.kill(pid, signal.SIGKILL)


def test_bulk_deployment_on_the_gpu_pool(workers, s3_env, tiny_wan_path: Path,
                                          tmp_path: Path) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.deployments import run_deployment

    with get_client(sync_client=True) as client:
        bulk_deployment = client.read_deployment_by_name("bulk/bulk")
        (schedule,) = bulk_deployment.schedules
        assert schedule.schedule.cron == "0 2 * * *" and not schedule.active

    bucket = s3_env.create_bucket()
    dataset = write_dataset(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS[:2]])
    # Every stage on the GPU pool's warm worker (the default), then only denoising there.
    for name, options in (("all", {"device": "cpu"}),
                          ("denoise", {"placement": "denoise", "denoise_device": "cpu"})):
        output = f"s3://{bucket}/{name}"
        run = run_deployment("bulk/bulk", timeout=480, parameters=dict(
            dataset=str(dataset), output=output, model_path=str(tiny_wan_path), shard_size=2,
            enable_torch_compile=False, artifact_key=f"deploy-test-{name}", **options,
            **TINY))
        assert run.state.is_completed(), (run.state, _logs(tmp_path))
        rows = read_manifest(output)
        assert [r["status"] for r in rows.values()] == ["succeeded"] * 2
        assert all(r["video_uri"].startswith(f"{output}/videos/") for r in rows.values())

    with get_client(sync_client=True) as client:
        gpu_runs = {name: client.read_flow_runs(deployment_filter=DeploymentFilter(
            name=DeploymentFilterName(any_=[name]))) for name in ("gpu-shard", "gpu-denoise")}
    # One shard of two items each time: one GPU run of each kind, started by a bulk run.
    for runs in gpu_runs.values():
        assert [(r.state.name, r.parent_task_run_id is not None) for r in runs] == \
            [("Completed", True)]
    # The warm worker the gpu-shard run started lives on the GPU node for the next shard.
    assert len(running_workers(workers)) == 1


def _logs(tmp_path: Path) -> str:
    return "\n".join(p.read_text()[-3000:] for p in tmp_path.glob("worker-*.log"))


def test_kubernetes_gpu_job_template_is_accepted_by_the_server(prefect_server) -> None:
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    template = json.loads((REPO / "infra" / "k8s" / "gpu-job-template.json").read_text())
    with get_client(sync_client=True) as client:
        pool = client.create_work_pool(WorkPoolCreate(
            name="fastvideo-gpu-k8s", type="kubernetes", base_job_template=template),
            overwrite=True)
    variables = pool.base_job_template["variables"]["properties"]
    assert variables["gpu_count"]["default"] >= 1 and variables["shm_size"]["default"]
    resources = pool.base_job_template["job_configuration"]["job_manifest"]["spec"]["template"][
        "spec"]["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
