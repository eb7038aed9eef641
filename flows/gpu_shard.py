"""A shard on a GPU node: what the `gpu-shard` deployment runs on the GPU pool.

The bulk and generate flows start it with `run_deployment` (see `tasks.shard`) when every
stage goes to the GPU pool; it hands the shard to this node's warm worker (started by the
first run that needs it, kept for the next ones) and writes the results next to the job.

    python -m flows.gpu_shard --store s3://bucket/run --job-key jobs/shard/<digest>/job.json
"""

from __future__ import annotations

import argparse
import json
import sys

from prefect import flow
from prefect.states import Completed, Failed, State

from fastvideo.jobs.gpu_slots import gpu_slots
from fastvideo.jobs.items import to_jsonable
from fastvideo.storage import retry_io
from flows.cli import prepared_environment
from tasks.common import get_store, run_logger
from tasks.dispatch import Dispatch
from tasks.shard import read_shard_job, result_key, run_on_worker


@flow(name="gpu-shard", log_prints=True)
def gpu_shard(store_uri: str, job_key: str, nproc_per_node: int = 1,
              worker_idle_timeout_s: float = 1800.0) -> State:
    """Every stage of the shard stored at `job_key` on this node's warm worker (with
    `nproc_per_node` GPUs, replica `shard index % N`), on GPUs no other run of the node
    holds (`gpu_slots`)."""
    ctx, shard = read_shard_job(store_uri, job_key)
    dispatch = Dispatch(mode="worker", nproc_per_node=nproc_per_node, sp_size=1,
                        worker_idle_timeout_s=worker_idle_timeout_s)
    with gpu_slots(nproc_per_node, log=run_logger().info):
        results = run_on_worker(ctx, shard, dispatch)
    store = get_store(store_uri)
    retry_io(lambda: store.put_bytes(result_key(job_key),
                                     json.dumps(to_jsonable(results)).encode()))
    failed = [r for r in list(results.values())[-1] if not r.ok]
    counts = {"items": len(shard.items), "failed": len(failed)}
    if failed:
        return Failed(message=f"{len(failed)} of {len(shard.items)} items failed", data=counts)
    return Completed(message=f"{len(shard.items)} items made", data=counts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.gpu_shard",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--job-key", required=True)
    parser.add_argument("--nproc-per-node", type=int, default=1)
    parser.add_argument("--worker-idle-timeout-s", type=float, default=1800.0)
    args = parser.parse_args(argv)
    with prepared_environment():
        state = gpu_shard(args.store, args.job_key, args.nproc_per_node,
                          args.worker_idle_timeout_s, return_state=True)
    print(f"gpu shard ended {state.name}: {state.message}")
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
