"""The copy-engine all-to-all against NCCL's: same results, bandwidth, and cost to compute.

    torchrun --nproc-per-node 4 benchmarks/check_copy_engine.py --json-out ce.json

1. Correctness: `--exchanges` exchanges started back to back (more than the buffer's
   slots, so slots are reused while others are in flight) of random `[P, ...]` tensors,
   strided views included, must equal `all_to_all_single` exactly.
2. Bandwidth: one exchange of a Ulysses-sized tensor (Wan 1.3B 480p: 32760 tokens x 1536
   channels bf16 over P ranks) alone, per implementation.
3. Overlap: a chain of matmuls of the DiT's shape timed alone, then with one exchange
   started before each matmul and waited on after it; what the compute loses is the cost
   of communicating next to it (NCCL's kernels take SMs, the copy engines only bandwidth).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.distributed as dist

from fastvideo.distributed import destroy_distributed_environment, init_distributed_environment
from fastvideo.distributed.parallel_state import get_world_group


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=32760)
    parser.add_argument("--channels", type=int, default=1536)
    parser.add_argument("--exchanges", type=int, default=12)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json-out", type=Path)
    return parser.parse_args()


def timed_ms(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    slowest = torch.tensor(times, device="cuda")
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return statistics.median(slowest.tolist())


def exchange(group, impl: str, x: torch.Tensor) -> torch.Tensor:
    group.all_to_all_impl = impl
    out, work = group.start_all_to_all(x)
    work.wait()
    return out


def main() -> None:
    args = parse_args()
    init_distributed_environment()
    group = get_world_group()
    rank, world = group.rank_in_group, group.world_size
    torch.manual_seed(rank)
    report: dict = {"device": torch.cuda.get_device_name(), "world_size": world,
                    "torch": torch.__version__}

    # 1. Exactness, with slots reused while earlier exchanges are in flight.
    shapes = [(world, 1, args.tokens // world // 4, 4, 128), (world, 3, 1000), (world, 7)]
    mismatches = 0
    for impl in ("copy_engine",):
        group.all_to_all_impl = impl
        sent = []
        for i in range(args.exchanges):
            base = torch.randn(shapes[i % len(shapes)], device="cuda", dtype=torch.bfloat16)
            x = base.transpose(-1, -2) if i % 2 and base.dim() > 2 else base
            sent.append((x.clone(), group.start_all_to_all(x)))
            del x  # the exchange must not depend on the caller keeping its input
        for x, (out, work) in sent:
            work.wait()
            expected = torch.empty_like(x.contiguous())
            dist.all_to_all_single(expected, x.contiguous(), group=group.device_group)
            mismatches += int(not torch.equal(out, expected))
    total = torch.tensor([mismatches], device="cuda")
    dist.all_reduce(total)
    report["mismatching_exchanges"] = int(total.item())

    # 2. Bandwidth of one exchange alone.
    local = args.tokens // world
    x = torch.randn(world, 1, local, args.channels // world, device="cuda",
                    dtype=torch.bfloat16)
    nbytes = x.numel() * x.element_size() * (world - 1) / world
    for impl in ("collective", "copy_engine"):
        ms = timed_ms(lambda impl=impl: exchange(group, impl, x), args.iters)
        report[f"exchange_ms_{impl}"] = ms
        report[f"exchange_GBps_out_{impl}"] = nbytes / ms / 1e6

    # 3. Matmuls of the DiT's projections with exchanges in flight.
    a = torch.randn(local, args.channels, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(args.channels * 4, args.channels, device="cuda", dtype=torch.bfloat16)

    def matmuls(impl: str | None) -> None:
        group.all_to_all_impl = impl or "collective"
        for _ in range(8):
            pending = group.start_all_to_all(x) if impl else None
            torch.nn.functional.linear(a, w)
            if pending is not None:
                pending[1].wait()

    report["matmuls_alone_ms"] = timed_ms(lambda: matmuls(None), args.iters)
    for impl in ("collective", "copy_engine"):
        report[f"matmuls_with_exchanges_ms_{impl}"] = timed_ms(lambda i=impl: matmuls(i),
                                                               args.iters)
    if rank == 0:
        print(json.dumps(report, indent=2), flush=True)
        if args.json_out:
            args.json_out.write_text(json.dumps(report, indent=2))
    if report["mismatching_exchanges"]:
        raise SystemExit(f"{report['mismatching_exchanges']} exchanges differ from NCCL's")
    destroy_distributed_environment()


if __name__ == "__main__":
    main()
