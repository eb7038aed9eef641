"""DiT forward under sequence parallelism: ours (Ulysses) against diffusers' context parallelism.

    torchrun --nproc-per-node 4 benchmarks/bench_dit_sp.py --sp-sizes 1,2,4 --json-out sp.json
    torchrun --nproc-per-node 4 benchmarks/bench_dit_sp.py --config 14b --height 720 \
        --width 1280 --sp-sizes 4 --iters 2 --warmup 1 --json-out sp14b.json
    torchrun --nproc-per-node 4 benchmarks/bench_dit_sp.py --sp-sizes 1,2,4 \
        --serial-inputs --profile --json-out sp_overlap.json
    torchrun --nproc-per-node 2 benchmarks/bench_dit_sp.py --config tiny --device cpu \
        --dtype fp32 --height 64 --width 64 --frames 9 --text-len 16    # CPU smoke test (gloo)

Every sp size runs in the one torchrun world: at sp size k the world splits into world / k
groups that each run the same forward, so sp=1 on 4 GPUs is 4 independent one-GPU forwards.
Both models get the same random weights on every rank (seeded, then broadcast from rank 0).
At sp=1 diffusers runs plain eager; at k > 1 `enable_parallelism(ContextParallelConfig(
ulysses_degree=k))` on a copy, with a device mesh `(replica, ring=1, ulysses=k)` laid out like
our sp groups. Each timed forward starts after a barrier; an iteration's time is the slowest
rank's (CUDA events on GPU, wall clock on CPU); the median over iterations is reported.

Our variants at sp > 1: `ours` (the layers' defaults), `ours_carveoutN` (cuBLAS matmuls
kept off N SMs), `ours_serial` (the input all-to-alls started together after all
projections, as before they overlapped them). Head chunks, query chunks and q, k, v packed
in one message were variants too, removed with their knobs (benchmarks/RESULTS.md has
their figures). `--profile` then runs each variant under torch.profiler and prints rank 0's kernel
time per forward by kind, with the communication time during which no other kernel ran
(exposed).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import statistics
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from bench_dit import (
    CONFIGS,
    add_workload_args,
    build_models,
    covered_us,
    make_inputs,
    peak_memory_gib,
    sm_carveout,
    time_once,
)
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from fastvideo.attention import DistributedAttention
from fastvideo.distributed import (
    destroy_distributed_environment,
    destroy_model_parallel,
    get_sp_group,
    init_distributed_environment,
    initialize_model_parallel,
)
from fastvideo.fastvideo_args import parse_dtype
from fastvideo.models.compile import compile_repeated_blocks

Forward = Callable[[], torch.Tensor]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_workload_args(parser)
    parser.add_argument("--sp-sizes", default="1,2,4",
                        help="comma-separated sp sizes; those not dividing the world are skipped")
    parser.add_argument("--sm-carveouts", default="",
                        type=lambda v: [int(c) for c in v.split(",") if c],
                        help="comma-separated SM counts to keep from cuBLAS matmuls in our "
                             "forward at sp > 1, each a variant ours_carveout<N>")
    parser.add_argument("--serial-inputs", action="store_true",
                        help="also time ours with q, k, v exchanged together after all three "
                             "projections (the path before they overlapped), suffix _serial")
    parser.add_argument("--profile", action="store_true",
                        help="profile each of our variants at each sp size and print rank 0's "
                             "kernel time per forward by kind (comm, attention, matmul, other)")
    parser.add_argument("--profile-iters", type=int, default=3,
                        help="forwards per profiled variant")
    parser.add_argument("--high-priority-pass", action="store_true",
                        help="time ours again with the sp groups on high-priority NCCL streams "
                             "(TORCH_NCCL_HIGH_PRIORITY=1), suffix _hp")
    parser.add_argument("--compile", action="store_true",
                        help="also time our model with its blocks compiled, as the engine's "
                             "enable_torch_compile does, as ours_compiled")
    parser.add_argument("--cfg-pair", action="store_true",
                        help="also time a guidance step's two forwards as one batch of 2, "
                             "with its micro-batches pipelined (ours_cfgpair, with --compile "
                             "also ours_compiled_cfgpair) and not (ours_cfgpair_mb1), and "
                             "diffusers on the same batch")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json-out", type=Path, help="write the results as JSON here (rank 0)")
    return parser.parse_args()


def broadcast_(tensors: list[torch.Tensor]) -> None:
    """Rank 0's values everywhere: random init on several GPUs need not agree bit for bit."""
    for tensor in tensors:
        dist.broadcast(tensor, src=0)


@contextlib.contextmanager
def nccl_high_priority(enabled: bool) -> Iterator[None]:
    """Process groups created inside run NCCL on high-priority CUDA streams, so its kernels
    get SMs ahead of the compute they overlap."""
    old = os.environ.get("TORCH_NCCL_HIGH_PRIORITY")
    if enabled:
        os.environ["TORCH_NCCL_HIGH_PRIORITY"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCH_NCCL_HIGH_PRIORITY", None)
        else:
            os.environ["TORCH_NCCL_HIGH_PRIORITY"] = old


def high_priority_streams(device: torch.device) -> bool | None:
    """Whether the sp group's NCCL backend says it uses high-priority streams (None: unknown)."""
    try:
        backend = get_sp_group().device_group._get_backend(device)
        return bool(backend.options.is_high_priority_stream)
    except (AttributeError, RuntimeError):
        return None


def diffusers_context_parallel(reference: nn.Module, sp_size: int, in_place: bool) -> nn.Module:
    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    model = reference if in_place else copy.deepcopy(reference)
    device_type = next(reference.parameters()).device.type
    # Consecutive ranks form a ulysses group, as our sp groups (tp = 1) do.
    mesh = init_device_mesh(device_type, (dist.get_world_size() // sp_size, 1, sp_size),
                            mesh_dim_names=("replica", "ring", "ulysses"))
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=sp_size, mesh=mesh))
    return model


def attention_layers(model: nn.Module) -> list[DistributedAttention]:
    return [m for m in model.modules() if isinstance(m, DistributedAttention)]


@dataclasses.dataclass(frozen=True)
class Variant:
    """How our attention layers run the all-to-alls."""

    overlap_inputs: bool = True
    """False: `scatter_heads` hands the tensor back, so `forward` starts all three inputs'
    exchanges together, after the projections."""
    num_micro_batches: int = 2
    batch: int = 1
    """2: the conditional and unconditional inputs of a guidance step in one forward."""
    sm_carveout: int | None = None
    """SMs kept from cuBLAS matmuls during our forward (torch's experimental carveout)."""


def _keep_tensor(x: torch.Tensor) -> torch.Tensor:
    return x


def set_variant(layers: list[DistributedAttention], variant: Variant) -> None:
    for layer in layers:
        layer.num_micro_batches = variant.num_micro_batches
        if variant.overlap_inputs:
            layer.__dict__.pop("scatter_heads", None)
        else:
            layer.scatter_heads = _keep_tensor


def guidance_pair(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A guidance step's two forwards as one batch of 2: same latents and timestep, the
    prompt's text and (here) its negation as the unconditional text."""
    return {"hidden_states": inputs["hidden_states"].repeat(2, 1, 1, 1, 1),
            "timestep": inputs["timestep"].repeat(2),
            "encoder_hidden_states": torch.cat([inputs["encoder_hidden_states"],
                                                -inputs["encoder_hidden_states"]])}


def ours_forward(ours: nn.Module, inputs: dict[str, torch.Tensor], variant: Variant) -> Forward:
    layers = attention_layers(ours)  # found once: the forward is timed from its first line
    if variant.batch == 2:
        inputs = guidance_pair(inputs)

    def forward() -> torch.Tensor:
        set_variant(layers, variant)
        with sm_carveout(variant.sm_carveout):
            return ours(**inputs)
    return forward


def our_variants(sp_size: int, args: argparse.Namespace,
                 default: Variant) -> dict[str, Variant]:
    """Name -> variant: the default, then each other variant asked for."""
    variants = {"ours": default}
    if sp_size == 1:  # nothing is exchanged: every variant is the same forward
        if args.cfg_pair:
            variants["ours_cfgpair"] = dataclasses.replace(default, batch=2)
        return variants
    for carveout in args.sm_carveouts:
        variants[f"ours_carveout{carveout}"] = dataclasses.replace(default,
                                                                  sm_carveout=carveout)
    if args.serial_inputs:
        variants["ours_serial"] = dataclasses.replace(default, overlap_inputs=False)
    if args.cfg_pair:
        variants["ours_cfgpair"] = dataclasses.replace(default, batch=2)
        variants["ours_cfgpair_mb1"] = dataclasses.replace(default, batch=2,
                                                          num_micro_batches=1)
    return variants


# Kernel (GPU) or top-level op (CPU) name fragments of each kind, matched in this order:
# "fmha_cutlass" is attention, the cuDNN SDPA kernels contain "sdpa".
_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("comm", ("nccl", "gloo", "c10d::", "all_to_all", "alltoall", "allgather", "all_gather")),
    ("attention", ("flash", "fmha", "sdpa", "attention", "scaled_dot_product")),
    ("matmul", ("gemm", "nvjet", "cublas", "xmma", "cutlass", "aten::mm", "aten::addmm",
                "aten::linear", "aten::matmul", "conv")),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    for kind, fragments in _KINDS:
        if any(f in lowered for f in fragments):
            return kind
    return "other"


def kernel_breakdown(events: list[tuple[str, float, float]], num_forwards: int
                     ) -> dict[str, float]:
    """Milliseconds per forward: summed kernel time by kind; `comm_exposed`, when only
    communication ran; `idle`, when nothing ran; `span`, first kernel start to last end."""
    per_forward = 1e-3 / num_forwards
    by_kind = {kind: [] for kind, _ in _KINDS} | {"other": []}
    for name, start, end in events:
        by_kind[kernel_kind(name)].append((start, end))
    result = {kind: sum(e - s for s, e in spans) * per_forward for kind, spans in by_kind.items()}
    compute = [span for kind, spans in by_kind.items() if kind != "comm" for span in spans]
    busy = covered_us(compute + by_kind["comm"])
    result["comm_exposed"] = (busy - covered_us(compute)) * per_forward
    span = (max(e for _, _, e in events) - min(s for _, s, _ in events)) if events else 0.0
    result["idle"] = (span - busy) * per_forward
    result["span"] = span * per_forward
    return result


def profile_forward(fn: Forward, device: torch.device, num_forwards: int) -> dict[str, float]:
    """Run `fn` under torch.profiler; this rank's kernel breakdown (`kernel_breakdown`).

    On CPU the "kernels" are the top-level ops of each thread (gloo's transfers run on
    their own), so the smoke test exercises the same path."""
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize(device)
    dist.barrier()
    with profile(activities=activities) as prof:
        for _ in range(num_forwards):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    if device.type == "cuda":
        # CUPTI records this process's kernels only, i.e. this rank's GPU.
        events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        if not events:
            print(f"rank {dist.get_rank()}: the profiler recorded no CUDA kernels", flush=True)
    else:
        events = [e for e in prof.events()
                  if e.device_type == DeviceType.CPU and e.cpu_parent is None]
    return kernel_breakdown([(e.name, e.time_range.start, e.time_range.end) for e in events],
                            num_forwards)


def format_breakdown(name: str, sp_size: int, breakdown: dict[str, float], gpu: bool) -> str:
    kinds = ", ".join(f"{kind} {breakdown[kind]:.2f}"
                      for kind in ("comm", "attention", "matmul", "other"))
    unit = "kernel" if gpu else "top-level op"
    return (f"profile sp={sp_size} {name} (rank 0, ms per forward): {unit} time {kinds}; "
            f"comm exposed (nothing else running) {breakdown['comm_exposed']:.2f}, "
            f"idle {breakdown['idle']:.2f}, span {breakdown['span']:.2f}")


def timed(runs: dict[str, Forward], device: torch.device, warmup: int,
          iters: int) -> dict[str, list[float]]:
    """Per run, the slowest rank's milliseconds of each iteration (runs interleaved)."""
    def once(fn: Forward) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()
        return time_once(fn, device)

    for _ in range(warmup):
        for fn in runs.values():
            once(fn)
    times = {name: [] for name in runs}
    for _ in range(iters):
        for name, fn in runs.items():
            times[name].append(once(fn))
    slowest = torch.tensor([times[name] for name in runs], dtype=torch.float64,
                           device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return dict(zip(runs, slowest.tolist()))


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def param_gib(model: nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30


def bench_sp_size(sp_size: int, args: argparse.Namespace, config: dict[str, Any],
                  reference: nn.Module, ours: nn.Module, inputs: dict[str, torch.Tensor],
                  device: torch.device, last: bool, high_priority: bool = False,
                  ours_sp1_out: torch.Tensor | None = None,
                  ours_compiled: nn.Module | None = None
                  ) -> tuple[dict[str, Any], torch.Tensor | None, torch.Tensor]:
    """Time ours (each variant) and diffusers at one sp size; returns the results and the
    outputs of diffusers (None where it did not run) and ours. With `high_priority` only ours
    runs, its sp group on high-priority NCCL streams. `ours_sp1_out`: ours at sp=1, to check
    every variant against."""
    with nccl_high_priority(high_priority):
        initialize_model_parallel(1, sp_size)
    layer = attention_layers(ours)[0]
    variants = our_variants(sp_size, args, Variant(num_micro_batches=layer.num_micro_batches))
    runs: dict[str, Forward] = {name: ours_forward(ours, inputs, variant)
                                for name, variant in variants.items()}
    if ours_compiled is not None and not high_priority:
        runs["ours_compiled"] = ours_forward(ours_compiled, inputs, variants["ours"])
        if args.cfg_pair:
            runs["ours_compiled_cfgpair"] = ours_forward(ours_compiled, inputs,
                                                         variants["ours_cfgpair"])
    diffusers_model = None
    if sp_size == 1 and not high_priority:
        diffusers_model = reference
    elif device.type == "cuda" and not high_priority:  # diffusers needs an accelerator
        diffusers_model = diffusers_context_parallel(reference, sp_size, in_place=last)
    if diffusers_model is not None:
        runs["diffusers"] = lambda: diffusers_model(**inputs, return_dict=False)[0]
        if args.cfg_pair:
            pair = guidance_pair(inputs)
            runs["diffusers_cfgpair"] = lambda: diffusers_model(**pair, return_dict=False)[0]

    with torch.inference_mode():
        outputs = {name: fn() for name, fn in runs.items()}
        memory = {name: peak_memory_gib(fn, device) for name, fn in runs.items()}
        times = timed(runs, device, args.warmup, args.iters)
        profiles = ({name: profile_forward(runs[name], device, args.profile_iters)
                     for name in variants} if args.profile and not high_priority else {})
    set_variant(attention_layers(ours), variants["ours"])  # defaults again for the next sp size
    hp_streams = high_priority_streams(device) if device.type == "cuda" else None
    destroy_model_parallel()
    if dist.get_rank() == 0:
        for name, breakdown in profiles.items():
            print(format_breakdown(name, sp_size, breakdown, device.type == "cuda"), flush=True)
    result: dict[str, Any] = {
        "nccl_high_priority_streams": hp_streams,
        "median_ms": {name: statistics.median(t) for name, t in times.items()},
        "all_ms": times, "peak_memory_gib": memory,
        "variants": {name: dataclasses.asdict(v) for name, v in variants.items()},
        "profile_ms_per_forward_rank0": profiles or None,
        "max_abs_diff_ours_vs_diffusers_same_sp": (
            max_abs_diff(outputs["ours"], outputs["diffusers"]) if "diffusers" in outputs
            else None),
    }
    if "ours_compiled" in outputs:  # Inductor's fused bf16 element-wise rounds differently
        result["max_abs_diff_compiled_vs_ours_same_sp"] = max_abs_diff(
            outputs["ours_compiled"], outputs["ours"])
    if ours_sp1_out is not None:
        result["max_abs_diff_vs_ours_sp1"] = {
            name: max_abs_diff(outputs[name][:1], ours_sp1_out[:1]) for name in variants}
    return result, outputs.get("diffusers"), outputs["ours"]


def _base_run(name: str, runs_at_sp1: dict[str, float]) -> str:
    """The sp=1 run `name` compares with: itself, else its longest prefix that ran at sp=1
    (`ours_serial` -> `ours`, `ours_compiled_x` -> `ours_compiled`)."""
    parts = name.split("_")
    for end in range(len(parts), 0, -1):
        if "_".join(parts[:end]) in runs_at_sp1:
            return "_".join(parts[:end])
    return name


def summarise(results: dict[int, dict[str, Any]]) -> None:
    """Add speed-ups over sp=1 and scaling efficiency, where sp=1 was measured."""
    base = results.get(1)
    for sp_size, result in results.items():
        if base is None:
            continue
        # Each run against itself at sp=1, a variant against plain `ours` (it has no sp=1).
        base_name = {name: _base_run(name, base["median_ms"]) for name in result["median_ms"]}
        result["speedup_over_sp1"] = {
            name: base["median_ms"][base_name[name]] / ms
            for name, ms in result["median_ms"].items() if base_name[name] in base["median_ms"]}
        result["scaling_efficiency"] = {name: s / sp_size
                                        for name, s in result["speedup_over_sp1"].items()}


def main() -> None:
    args = parse_args()
    init_distributed_environment()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = (torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda"
              else torch.device(args.device))
    dtype, config = parse_dtype(args.dtype), CONFIGS[args.config]
    asked = sorted(int(s) for s in args.sp_sizes.split(","))
    sp_sizes = [k for k in asked
                if world_size % k == 0 and config["num_attention_heads"] % k == 0]
    if rank == 0 and sp_sizes != asked:
        print(f"skipping sp sizes {sorted(set(asked) - set(sp_sizes))}: they must divide the "
              f"world size {world_size} and the {config['num_attention_heads']} heads")

    torch.manual_seed(0)
    reference, ours = build_models(config, device, dtype)
    inputs = make_inputs(config, args, device, dtype)
    with torch.no_grad():
        broadcast_([*reference.parameters(), *ours.parameters(), *inputs.values()])
    ours_compiled = None
    if args.compile:
        ours_compiled = copy.deepcopy(ours)
        compile_repeated_blocks(ours_compiled, dtype=dtype)

    results: dict[int, dict[str, Any]] = {}
    reference_out = ours_sp1_out = None
    for sp_size in sp_sizes:
        result, diffusers_out, ours_out = bench_sp_size(
            sp_size, args, config, reference, ours, inputs, device, last=sp_size == sp_sizes[-1],
            ours_sp1_out=ours_sp1_out, ours_compiled=ours_compiled)
        if args.high_priority_pass and sp_size > 1 and device.type == "cuda":
            high, _, _ = bench_sp_size(sp_size, args, config, reference, ours, inputs, device,
                                       last=False, high_priority=True)
            result["nccl_high_priority_streams_hp"] = high["nccl_high_priority_streams"]
            for key in ("median_ms", "all_ms", "peak_memory_gib"):
                result[key].update({f"{name}_hp": v for name, v in high[key].items()})
        if sp_size == 1:
            reference_out, ours_sp1_out = diffusers_out, ours_out
        else:
            result["max_abs_diff_ours_vs_ours_sp1"] = (
                max_abs_diff(ours_out, ours_sp1_out) if ours_sp1_out is not None else None)
        result["max_abs_diff_ours_vs_diffusers_sp1"] = (
            max_abs_diff(ours_out, reference_out) if reference_out is not None else None)
        results[sp_size] = result
        if rank == 0:
            print(f"sp={sp_size}: " + ", ".join(
                f"{name} {ms:.2f} ms" for name, ms in result["median_ms"].items()), flush=True)
    summarise(results)

    if rank == 0:
        report = {
            "config": args.config, "world_size": world_size, "torch": torch.__version__,
            "device": (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
            "dtype": str(dtype), "latent_shape": list(inputs["hidden_states"].shape),
            "text_len": args.text_len, "iters": args.iters, "warmup": args.warmup,
            "weights_gib": {"ours": param_gib(ours), "diffusers": param_gib(reference)},
            "max_abs_output": (reference_out.float().abs().max().item()
                               if reference_out is not None else None),
            "by_sp_size": results,
        }
        print(json.dumps({k: v for k, v in report.items() if k != "by_sp_size"}))
        for sp_size, result in results.items():
            print(f"sp={sp_size}: " + json.dumps(
                {k: v for k, v in result.items() if k != "all_ms"}))
        if args.json_out:
            args.json_out.write_text(json.dumps(report, indent=2))
    destroy_distributed_environment()


if __name__ == "__main__":
    main()
