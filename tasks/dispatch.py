"""Where a run's stages run: `Dispatch`, fixed and checked when the run starts.

* `inprocess`: every stage in the flow's own process (tests, the demo, a laptop);
* `worker`: the warm worker on this node (`fastvideo.entrypoints.warm_worker`): a
  long-lived process that keeps the loaded, compiled model and takes shard after shard;
* `deployment`: a flow run of a GPU deployment, on a node of the GPU work pool, which
  hands the shard to that node's warm worker; the flow's machine needs neither a GPU
  nor the weights;
* `torchrun`: a `torchrun` job per shard on this node, for denoising only.

`placement` says which stages go to the target: `all` (the default for a GPU target:
text encoding, latents, denoising, decoding and the video) or `denoise` (only
denoising; the flow's process runs the rest, on its own device).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fastvideo.jobs.replicas import check_sp_size

Mode = Literal["inprocess", "worker", "torchrun", "deployment"]
Placement = Literal["all", "denoise"]
Launcher = Literal["inprocess", "torchrun"]
MODES = ("inprocess", "worker", "torchrun", "deployment")
SHARD_DEPLOYMENT = "gpu-shard/gpu-shard"
DENOISE_DEPLOYMENT = "denoise-job/gpu-denoise"


@dataclass(frozen=True)
class Dispatch:
    """Where stages run. Not part of any cache key: the result does not depend on it."""

    mode: Mode = "inprocess"
    placement: Placement | None = None
    """Stages that go to the target: `all`, or `denoise` only. None: `all` for `worker`
    and `deployment`, `denoise` for `torchrun` (which runs nothing else)."""
    nproc_per_node: int = 1
    """Processes (GPUs) per job on the target node: the DiT runs sequence parallel over
    them; a GPU deployment run also asks its infrastructure for that many GPUs (job
    variable `gpu_count`)."""
    sp_size: int | None = None
    """Processes per model replica (default: all `nproc_per_node`); with fewer, the
    processes form replicas that split the items (many videos sooner, each one later)."""
    deployment: str | None = None
    """`flow-name/deployment-name` of the GPU deployment; default `gpu-shard/gpu-shard`
    (placement all) or `denoise-job/gpu-denoise` (placement denoise)."""
    remote_launcher: Launcher = "inprocess"
    """How the `gpu-denoise` deployment runs a denoise job (placement denoise)."""
    timeout_s: float | None = None
    """How long to wait for a GPU run (None: as long as it takes)."""
    worker_idle_timeout_s: float = 1800.0
    """A warm worker with no request for this long exits and frees its GPU."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"dispatch must be one of {list(MODES)}, got {self.mode!r}")
        if self.placement not in (None, "all", "denoise"):
            raise ValueError(f"placement must be 'all' or 'denoise', got {self.placement!r}")
        if self.mode == "torchrun" and self.placement == "all":
            raise ValueError("placement 'all' needs a warm worker: dispatch 'worker' or "
                             "'deployment' (a torchrun job per shard denoises only)")
        if self.remote_launcher not in ("inprocess", "torchrun"):
            raise ValueError(f"remote_launcher must be inprocess or torchrun, "
                             f"got {self.remote_launcher!r}")
        if self.worker_idle_timeout_s <= 0:
            raise ValueError(f"worker_idle_timeout_s must be > 0, got "
                             f"{self.worker_idle_timeout_s}")
        if self.nproc_per_node < 1:
            raise ValueError(f"nproc_per_node must be >= 1, got {self.nproc_per_node}")
        check_sp_size(self.nproc_per_node, self.sp_size)
        if self.uses_worker and self.nproc_per_node > 1 and (self.sp_size or
                                                              self.nproc_per_node) > 1:
            raise ValueError(
                f"a warm worker runs one process per GPU: with nproc_per_node="
                f"{self.nproc_per_node}, set sp_size 1 (one replica per GPU); sequence "
                f"parallel over several GPUs needs dispatch 'torchrun' or the "
                f"'gpu-denoise' deployment (placement 'denoise')")
        if not self.uses_worker:
            check_launcher(self.mode if self.mode != "deployment" else self.remote_launcher,
                           self.nproc_per_node, self.sp_size)

    @property
    def resolved_placement(self) -> Placement:
        if self.placement is not None:
            return self.placement
        return "all" if self.mode in ("worker", "deployment") else "denoise"

    @property
    def remote_stages(self) -> bool:
        """Every stage runs on the target (a warm worker), none in the flow's process."""
        return self.mode != "inprocess" and self.resolved_placement == "all"

    @property
    def uses_worker(self) -> bool:
        """Jobs go to a warm worker: every stage on a GPU target, or `worker` denoising."""
        return self.remote_stages or self.mode == "worker"

    @property
    def deployment_name(self) -> str:
        if self.deployment is not None:
            return self.deployment
        return SHARD_DEPLOYMENT if self.remote_stages else DENOISE_DEPLOYMENT


def check_launcher(launcher: Launcher, nproc_per_node: int, sp_size: int | None = None) -> None:
    """ValueError unless `launcher` can run `nproc_per_node` processes in replicas of
    `sp_size`."""
    if nproc_per_node < 1:
        raise ValueError(f"nproc_per_node must be >= 1, got {nproc_per_node}")
    check_sp_size(nproc_per_node, sp_size)
    if nproc_per_node > 1 and launcher != "torchrun":
        raise ValueError(
            f"nproc_per_node={nproc_per_node} needs torchrun: --dispatch torchrun, or "
            f"--dispatch deployment --placement denoise --remote-launcher torchrun "
            f"(got {launcher})")
