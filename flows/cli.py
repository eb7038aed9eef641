"""Command-line plumbing shared by `python -m flows.<name>`: options and the closing message."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect.settings import PREFECT_API_URL, PREFECT_HOME, PREFECT_UI_URL

# Same names, types and help as `fastvideo generate`'s sampling options.
from fastvideo.entrypoints.cli import add_dataclass_options
from fastvideo.fastvideo_args import SamplingParam

RUN_OPTIONS = ("shard_size", "concurrency", "checkpoint_every", "checkpoint_store",
               "denoise_dispatch", "nproc_per_node", "denoise_sp_size", "denoise_deployment",
               "remote_launcher",
               "device", "dtype", "denoise_device", "denoise_dtype", "fps")


def add_options(parser: argparse.ArgumentParser) -> None:
    """The sampling options of `fastvideo generate` and the run options of the flows."""
    sampling = parser.add_argument_group("sampling options (as in `fastvideo generate`)")
    add_dataclass_options(sampling, SamplingParam, skip=set())
    run = parser.add_argument_group("run options")
    run.add_argument("--shard-size", type=int, help="items per task run (default 1)")
    run.add_argument("--concurrency", type=int,
                     help="shards submitted together per stage (default 1)")
    run.add_argument("--checkpoint-every", type=int,
                     help="save denoising state every this many steps (default 5)")
    run.add_argument("--checkpoint-store",
                     help="store URI for checkpoints (default: the output)")
    run.add_argument("--denoise-dispatch", choices=["inprocess", "torchrun", "deployment"],
                     help="where denoising runs (default inprocess)")
    run.add_argument("--denoise-procs", "--nproc-per-node", dest="nproc_per_node", type=int,
                     metavar="N",
                     help="processes (GPUs) per denoise job under torchrun, here or on the GPU "
                          "node; the DiT runs sequence parallel over them (default 1)")
    run.add_argument("--denoise-sp-size", type=int, metavar="K",
                     help="processes per model replica in a denoise job (default: all N); "
                          "the N / K replicas split the job's items, for throughput")
    run.add_argument("--denoise-deployment",
                     help="GPU deployment for --denoise-dispatch deployment "
                          "(default denoise-job/gpu-denoise)")
    run.add_argument("--remote-launcher", choices=["inprocess", "torchrun"],
                     help="how the GPU deployment runs a job (default inprocess)")
    run.add_argument("--device", help="engine device (default: cuda if available, else cpu)")
    run.add_argument("--dtype", help="engine dtype (default: bf16 on cuda, fp32 on cpu)")
    run.add_argument("--denoise-device",
                     help="device of the denoise jobs (default: --device, or cuda with "
                          "--denoise-dispatch deployment)")
    run.add_argument("--denoise-dtype", help="dtype of the denoise jobs (default: bf16 on cuda)")
    run.add_argument("--fps", type=int, help="frames per second of the videos (default 16)")


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling and run options given on the command line (the flow has the defaults)."""
    names = (*SamplingParam.option_names(), *RUN_OPTIONS)
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def prepare_environment() -> None:
    """Settings for a command-line run: no telemetry offline, patience for a slow start."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def local_path(uri: str) -> str:
    """Absolute form of a plain path (a URI is kept), so a run's records name real places."""
    return uri if "://" in uri else str(Path(uri).resolve())


def ui_hint(flow_run_id: UUID | None) -> str:
    """How to look at the run in the Prefect UI."""
    path = f"/runs/flow-run/{flow_run_id}" if flow_run_id else "/runs"
    if PREFECT_API_URL.value():
        return f"Prefect UI: {(PREFECT_UI_URL.value() or '').rstrip('/')}{path}"
    return ("This run used Prefect's embedded server; its runs, logs and artifacts are kept in "
            f"{PREFECT_HOME.value()}/prefect.db. To browse them: `prefect server start`, then "
            f"open http://127.0.0.1:4200{path}")
