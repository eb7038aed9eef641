"""prefect.yaml deployed to a real server, run by process workers, denoising on the GPU pool."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.flows.helpers import PROMPTS, REPO, TINY, read_manifest, stop_group, write_dataset

POOLS = ("fastvideo-cpu", "fastvideo-gpu")


@pytest.fixture
def workers(prefect_server, flow_env: dict[str, str], s3_env, tmp_path: Path
            ) -> Iterator[None]:
    """Pools, deployments from prefect.yaml, and one process worker per pool."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    env = {**flow_env, **s3_env.env(), "FASTVIDEO_CODE_DIR": str(REPO),
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_HEARTBEAT_SECONDS": "5"}
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
        yield
    finally:
        for log, proc in procs:
            stop_group(proc)
            log.close()


def test_bulk_deployment_with_gpu_denoise_deployment(workers, s3_env, tiny_wan_path: Path,
                                                     tmp_path: Path) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.deployments import run_deployment

    with get_client(sync_client=True) as client:
        bulk_deployment = client.read_deployment_by_name("bulk/bulk")
        (schedule,) = bulk_deployment.schedules
        assert schedule.schedule.cron == "0 2 * * *" and not schedule.active

    bucket = s3_env.create_bucket()
    output = f"s3://{bucket}/deployed"
    dataset = write_dataset(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS[:2]])
    run = run_deployment("bulk/bulk", timeout=480, parameters=dict(
        dataset=str(dataset), output=output, model_path=str(tiny_wan_path), shard_size=2,
        dispatch="deployment", denoise_device="cpu", artifact_key="deploy-test",
        **TINY))
    assert run.state.is_completed(), (run.state, _logs(tmp_path))

    rows = read_manifest(output)
    assert [r["status"] for r in rows.values()] == ["succeeded"] * 2
    assert all(r["video_uri"].startswith(f"s3://{bucket}/deployed/videos/") for r in rows.values())
    with get_client(sync_client=True) as client:
        gpu_runs = client.read_flow_runs(deployment_filter=DeploymentFilter(
            name=DeploymentFilterName(any_=["gpu-denoise"])))
    # One shard of two items: one GPU run, started by the bulk run.
    assert [(r.state.name, r.parent_task_run_id is not None) for r in gpu_runs] == \
        [("Completed", True)]


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
