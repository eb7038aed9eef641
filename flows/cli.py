"""Command-line plumbing shared by `python -m flows.<name>`: options, the early start of a
warm worker and the closing message. Imports no Prefect (`start_worker_from_argv` runs
before the flows import it)."""

from __future__ import annotations

import argparse
import contextlib
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn
from uuid import UUID

# Same names, types and help as `fastvideo generate`'s sampling options.
from fastvideo.entrypoints.cli import add_dataclass_options
from fastvideo.fastvideo_args import SamplingParam
from fastvideo.jobs.options import EngineOptions
from tasks.dispatch import Dispatch

RUN_OPTIONS = ("shard_size", "concurrency", "checkpoint_every", "checkpoint_store",
               "dispatch", "placement", "nproc_per_node", "sp_size", "deployment",
               "remote_launcher", "worker_idle_timeout_s",
               "device", "dtype", "denoise_device", "denoise_dtype", "fps")
ENGINE_OPTIONS = ("attention_backend", "sta_config", "enable_torch_compile", "batch_cfg",
                  "vae_dtype", "compile_cache_dir", "step_cache_threshold")


def add_options(parser: argparse.ArgumentParser) -> None:
    """The sampling options of `fastvideo generate`, and the run and engine options."""
    sampling = parser.add_argument_group("sampling options (as in `fastvideo generate`)")
    add_dataclass_options(sampling, SamplingParam, skip=set())
    run = parser.add_argument_group("run options")
    run.add_argument("--shard-size", type=int, help="items per task run (default 1)")
    run.add_argument("--concurrency", type=int,
                     help="shards in flight together (default 1; a warm worker also gets "
                          "the next ones queued)")
    run.add_argument("--checkpoint-every", type=int,
                     help="save denoising state every this many steps (default 5)")
    run.add_argument("--checkpoint-store",
                     help="store URI for checkpoints (default: the output)")
    run.add_argument("--dispatch", choices=["inprocess", "worker", "torchrun", "deployment"],
                     help="where stages run: this process (default), this node's warm "
                          "worker, a torchrun job per shard (denoising), or the GPU pool")
    run.add_argument("--placement", choices=["all", "denoise"],
                     help="stages that go to the worker or GPU pool: all (default) or "
                          "denoise only")
    run.add_argument("--denoise-procs", "--nproc-per-node", dest="nproc_per_node", type=int,
                     metavar="N",
                     help="processes (GPUs) per job on the target node (default 1): the DiT "
                          "runs sequence parallel over them under torchrun; warm workers run "
                          "one replica per GPU")
    run.add_argument("--sp-size", type=int, metavar="K",
                     help="processes per model replica (default: all N); the N / K "
                          "replicas split the items, for throughput")
    run.add_argument("--deployment",
                     help="GPU deployment for --dispatch deployment (default "
                          "gpu-shard/gpu-shard, or denoise-job/gpu-denoise with "
                          "--placement denoise)")
    run.add_argument("--remote-launcher", choices=["inprocess", "torchrun"],
                     help="how the gpu-denoise deployment runs a job (default inprocess)")
    run.add_argument("--worker-idle-timeout-s", type=float,
                     help="a warm worker exits after this long without work (default 1800)")
    run.add_argument("--device", help="engine device (default: cuda if available, else cpu; "
                                      "cuda on the GPU pool)")
    run.add_argument("--dtype", help="engine dtype (default: bf16 on cuda, fp32 on cpu)")
    run.add_argument("--denoise-device",
                     help="with --placement denoise: device of denoising (default: --device, "
                          "or cuda with --dispatch deployment)")
    run.add_argument("--denoise-dtype", help="with --placement denoise: dtype of denoising")
    run.add_argument("--fps", type=int, help="frames per second of the videos (default 16)")
    engine = parser.add_argument_group("engine options (every process that runs a stage)")
    engine.add_argument("--attention-backend",
                        help="attention backend of the DiT, e.g. FLASH_ATTN, TORCH_SDPA "
                             "(default: each layer's fastest here)")
    engine.add_argument("--sta-config", metavar="FILE",
                        help="sliding tile attention windows (JSON from python -m "
                             "fastvideo.entrypoints.sta_search); selects SLIDING_TILE_ATTN")
    engine.add_argument("--compile", "--enable-torch-compile", dest="enable_torch_compile",
                        action="store_true", default=None,
                        help="compile the DiT's blocks with torch.compile (pays off from the "
                             "first video on a warm worker)")
    engine.add_argument("--batch-cfg", dest="batch_cfg", action="store_true", default=None,
                        help="run guidance as one DiT batch of 2 (default: only under "
                             "sequence parallelism, where it hides all-to-alls)")
    engine.add_argument("--no-batch-cfg", dest="batch_cfg", action="store_false", default=None,
                        help="run guidance as two DiT forwards (half the activation memory)")
    engine.add_argument("--vae-dtype", help="dtype of the VAE decode (default float32)")
    engine.add_argument("--compile-cache-dir", metavar="DIR",
                        help="where compiled kernels persist across processes, on the node "
                             "running the stages (default: PyTorch's, under /tmp)")
    engine.add_argument("--step-cache-threshold", type=float, metavar="X",
                        help="skip DiT steps whose modulated input changed little, "
                             "TeaCache-style (default: off; see docs/attention_and_speed.md)")


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling, run and engine options given on the command line (the flow has the
    defaults)."""
    names = (*SamplingParam.option_names(), *RUN_OPTIONS, *ENGINE_OPTIONS)
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def run_settings(dispatch: str, placement: str | None, nproc_per_node: int,
                 sp_size: int | None, deployment: str | None, remote_launcher: str,
                 worker_idle_timeout_s: float, attention_backend: str | None,
                 sta_config: str | None, enable_torch_compile: bool, batch_cfg: bool | None,
                 vae_dtype: str, compile_cache_dir: str | None,
                 step_cache_threshold: float | None) -> tuple[Dispatch, EngineOptions]:
    """The flows' dispatch and engine parameters as checked objects: a bad value fails the
    run here, at its start, with a message naming the option."""
    return (Dispatch(mode=dispatch, placement=placement, nproc_per_node=nproc_per_node,
                     sp_size=sp_size, deployment=deployment, remote_launcher=remote_launcher,
                     worker_idle_timeout_s=worker_idle_timeout_s),
            EngineOptions.with_sta_file(
                sta_config, attention_backend=attention_backend,
                enable_torch_compile=enable_torch_compile, batch_cfg=batch_cfg,
                vae_dtype=vae_dtype, compile_cache_dir=compile_cache_dir,
                step_cache_threshold=step_cache_threshold))


FLOW_RUN_DEFAULTS: dict[str, Any] = dict(
    dispatch="inprocess", placement=None, nproc_per_node=1, sp_size=None, deployment=None,
    remote_launcher="inprocess", worker_idle_timeout_s=1800.0, device=None, dtype=None,
    attention_backend=None, sta_config=None, enable_torch_compile=False, batch_cfg=None,
    vae_dtype="float32", compile_cache_dir=None, step_cache_threshold=None)
"""The flows' defaults of what picks a warm worker (the flows' signatures repeat them, for
Prefect's parameter schema; a test keeps the two equal)."""


class _QuietParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ValueError(message)


def start_worker_from_argv(argv: list[str]) -> None:
    """`python -m flows.<name>`'s first act, before it imports Prefect and the stages (a
    warm worker's start-up is the first video's critical path): with every stage on this
    node's warm worker, start it loading the model. The command line is parsed again, and
    reported on, by the flow's own parser."""
    parser = _QuietParser(add_help=False)
    parser.add_argument("--model-path")
    add_options(parser)
    try:
        args, _ = parser.parse_known_args(argv)
    except ValueError:
        return
    if args.model_path:
        start_worker_early(args.model_path, given_options(args))


def start_worker_early(model_path: str, options: dict[str, Any]) -> None:
    """With every stage on this node's warm worker, start it loading the model now, while
    this process imports the flow and Prefect starts its server (side by side instead of
    one after the other). Bad options are left for the flow to report."""
    given = {**FLOW_RUN_DEFAULTS, **options}
    names = inspect.signature(run_settings).parameters
    try:
        dispatch, engine = run_settings(**{name: given[name] for name in names})
        if dispatch.mode != "worker" or not dispatch.remote_stages:
            return
        from fastvideo.fastvideo_args import FastVideoArgs
        from fastvideo.jobs.worker_client import ensure_worker, warm_up_hints, worker_spec_for

        path = str(Path(model_path).resolve())
        args = FastVideoArgs(model_path=path, dtype=given["dtype"],
                             **({"device": given["device"]} if given["device"] else {}))
        for index in range(dispatch.nproc_per_node):
            spec = worker_spec_for(path, args.device, args.dtype, engine,
                                   dispatch.nproc_per_node, index)
            ensure_worker(spec, dispatch.worker_idle_timeout_s, wait=False,
                          warm_up=warm_up_hints(given))
    except (ValueError, OSError):
        return


def worker_hint(options: dict[str, Any]) -> str | None:
    """What a user should know about the warm workers a run leaves loaded, if any."""
    from fastvideo.jobs.worker_client import running_workers

    if options.get("dispatch") != "worker" or not running_workers():
        return None
    idle = options.get("worker_idle_timeout_s", 1800.0)
    return (f"{len(running_workers())} warm worker(s) keep the model loaded for the next run "
            f"and exit after {idle:.0f} s idle; `python -m fastvideo.jobs.worker_client stop` "
            "frees the GPU now")


@contextlib.contextmanager
def prepared_environment() -> Iterator[None]:
    """Settings for a command-line run, unless the environment sets them
    (`embedded_server.COMMAND_LINE_SETTINGS`). Prefect reads its settings when imported, so
    they are applied as temporary settings (and in the environment, for subprocesses). The
    embedded server a command started early (`embedded_server.start_early`) is handed to
    Prefect here."""
    import prefect.settings

    from flows import embedded_server

    missing = embedded_server.apply_command_line_settings()
    updates = {getattr(prefect.settings, name): value for name, value in missing.items()}
    with prefect.settings.temporary_settings(updates=updates):
        embedded_server.adopt()
        yield


def local_path(uri: str) -> str:
    """Absolute form of a plain path (a URI is kept), so a run's records name real places."""
    return uri if "://" in uri else str(Path(uri).resolve())


def ui_hint(flow_run_id: UUID | None) -> str:
    """How to look at the run in the Prefect UI."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, PREFECT_UI_URL

    path = f"/runs/flow-run/{flow_run_id}" if flow_run_id else "/runs"
    if PREFECT_API_URL.value():
        return f"Prefect UI: {(PREFECT_UI_URL.value() or '').rstrip('/')}{path}"
    return ("This run used Prefect's embedded server; its runs, logs and artifacts are kept in "
            f"{PREFECT_HOME.value()}/prefect.db. To browse them: `prefect server start`, then "
            f"open http://127.0.0.1:4200{path}")
