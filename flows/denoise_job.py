"""The GPU denoise job as a flow: what the `gpu-denoise` deployment runs on the GPU pool.

The bulk and generate flows start it with `run_deployment` (see `tasks.denoise`); the
job description and its outcomes live in the store, so only their keys are parameters.

    python -m flows.denoise_job --store s3://bucket/run --job-key jobs/denoise/<digest>/job.json
"""

from __future__ import annotations

import argparse
import sys

from prefect import flow
from prefect.states import Completed, Failed, State

from fastvideo.jobs.gpu_slots import gpu_slots
from flows.cli import prepared_environment
from tasks.common import run_logger
from tasks.denoise import run_denoise_job_task


@flow(name="denoise-job")
def denoise_job(store_uri: str, job_key: str, launcher: str = "inprocess",
                nproc_per_node: int = 1, sp_size: int | None = None) -> State:
    """Denoise the items of the job stored at `job_key` in `store_uri` on this node.

    `launcher` is inprocess (this process) or torchrun (`nproc_per_node` processes, in
    model replicas of `sp_size` of them; default one replica of all), on GPUs no other
    run of the node holds (`gpu_slots`).
    """
    with gpu_slots(nproc_per_node, log=run_logger().info):
        counts = run_denoise_job_task(store_uri, job_key, launcher, nproc_per_node, sp_size)
    if counts["failed"]:
        return Failed(message=f"{counts['failed']} of {counts['items']} items failed",
                      data=counts)
    return Completed(message=f"{counts['items']} items denoised", data=counts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.denoise_job",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--job-key", required=True)
    parser.add_argument("--launcher", choices=["inprocess", "torchrun"], default="inprocess")
    parser.add_argument("--nproc-per-node", type=int, default=1)
    parser.add_argument("--sp-size", type=int, default=None)
    args = parser.parse_args(argv)
    with prepared_environment():
        state = denoise_job(args.store, args.job_key, args.launcher, args.nproc_per_node,
                            args.sp_size, return_state=True)
    print(f"denoise job ended {state.name}: {state.message}")
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
