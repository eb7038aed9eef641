"""The denoise job under torchrun: one process per GPU, the job read from the store.

    torchrun --nproc-per-node N -m fastvideo.entrypoints.denoise_worker \
        --store s3://bucket/run --job-key jobs/denoise/<digest>/job.json

reads the job (`fastvideo.jobs.denoise`) from the store, prints one
`fastvideo-progress <item> <step> <total>` line per step, and writes the outcomes next to
the job (`result.json`). With N > 1 the DiT runs sequence parallel over `--sp-size` of
the processes (all by default), the others forming replicas; see `fastvideo.jobs.denoise`.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from collections.abc import Sequence

from fastvideo.distributed import (
    destroy_distributed_environment,
    get_world_group,
    init_distributed_environment,
    initialize_model_parallel,
)
from fastvideo.jobs.denoise import (
    DenoiseJob,
    DenoiseOutcome,
    broadcast_bytes,
    result_key,
    run_denoise_job,
)
from fastvideo.jobs.replicas import check_sp_size
from fastvideo.storage import open_store, retry_io

logger = logging.getLogger(__name__)

PROGRESS_PREFIX = "fastvideo-progress"
_PROGRESS_LINE = re.compile(rf"{PROGRESS_PREFIX} (\S+) (\d+) (\d+)")


def _print_progress(item_id: str, step: int, total: int) -> None:
    # One write(2) per line: the replicas' leaders share torchrun's stdout pipe, and a
    # write of under PIPE_BUF bytes lands whole. (print() writes the text and its newline
    # separately when stdout is unbuffered, so two leaders' lines could interleave.)
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), f"{PROGRESS_PREFIX} {item_id} {step} {total}\n".encode())


def parse_progress(line: str) -> tuple[str, int, int] | None:
    """`(item_id, step, total)` of a progress line, None for any other line."""
    match = _PROGRESS_LINE.fullmatch(line.strip())
    return None if match is None else (match[1], int(match[2]), int(match[3]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True, help="store URI holding the job")
    parser.add_argument("--job-key", required=True, help="key of the job's JSON in the store")
    parser.add_argument("--sp-size", type=int, default=None,
                        help="processes per replica, the DiT sequence parallel over them "
                             "(default: all); the replicas split the job's items")
    args = parser.parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    sp_size = check_sp_size(world_size, args.sp_size)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s rank {rank} %(levelname)s %(name)s: %(message)s")
    group = None
    if world_size > 1:
        init_distributed_environment()
        initialize_model_parallel(1, sp_size)
        group = get_world_group()
    store = open_store(args.store) if rank == 0 else None
    job_json = retry_io(lambda: store.get_bytes(args.job_key)) if rank == 0 else None
    if group is not None:
        job_json = broadcast_bytes(group, job_json)
    job = DenoiseJob.from_json(job_json)
    start = time.perf_counter()
    # An exception ends this process here, without a goodbye to the other ranks: they
    # may be stuck in a collective, and torchrun stops them.
    # Only each replica's first rank reports steps (the runner calls back on leaders only).
    outcomes = run_denoise_job(job, on_progress=_print_progress, group=group)
    if group is not None:
        destroy_distributed_environment()
    if rank == 0:
        retry_io(lambda: store.put_bytes(result_key(args.job_key),
                                         DenoiseOutcome.list_to_json(outcomes)))
        failed = sum(o.error is not None for o in outcomes)
        logger.info("denoised %d item(s), %d failed, on %d process(es) (%d replica(s)) in "
                    "%.1f s", len(outcomes), failed, world_size, world_size // sp_size,
                    time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
