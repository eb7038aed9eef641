"""One Ulysses exchange of Wan-1.3B's 480p attention inputs: NCCL against stores into peer memory.

    torchrun --nproc-per-node 4 benchmarks/bench_all_to_all.py --json-out a2a.json

For sp sizes 2 and 4 (subgroups of the torchrun world) it times one exchange of the head
blocks of a `[1, S/P, H, D]` bf16 tensor (S = 32760 tokens, H = 12 heads, D = 128), as
`DistributedAttention` sends q, k and v:

- `collective`: the blocks copied into a send buffer, then NCCL's `all_to_all_single`;
- `peer_push`: the engine's `PeerPushAllToAll` (one kernel stores each block into its peer's
  receive buffer, then a barrier).

Each alone (the slowest rank's time, median), and each on a side stream while the compute
stream runs eight matmuls of the DiT's size: what the matmuls lose is what an overlapped
exchange costs. Both results are checked equal.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch
import torch.distributed as dist

from fastvideo.distributed.peer_push import PeerPushAllToAll


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=32760)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-size", type=int, default=128)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--json-out", type=Path)
    return parser.parse_args()


def median_ms(fn, iters: int, group) -> float:
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        dist.barrier(group=group)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    slowest = torch.tensor(times, device="cuda")
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
    return statistics.median(slowest.tolist())


def head_blocks(x: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """`[B, S/P, H, D]` -> `[P, B, S/P, H/P, D]` view, block j for rank j."""
    batch, local, heads, head_size = x.shape
    return x.view(batch, local, num_ranks, heads // num_ranks, head_size).permute(2, 0, 1, 3, 4)


def measure(size: int, group, args: argparse.Namespace, side: torch.cuda.Stream) -> dict:
    local = args.tokens // size
    device = torch.device("cuda")
    x = torch.randn(1, local, args.heads, args.head_size, device=device, dtype=torch.bfloat16)
    push = PeerPushAllToAll(group, device)

    def collective() -> torch.Tensor:
        send = head_blocks(x, size).contiguous()
        out = torch.empty_like(send)
        dist.all_to_all_single(out, send, group=group)
        return out

    def peer_push() -> torch.Tensor:
        out, work = push.start(head_blocks(x, size))
        work.wait()
        work.release()
        return out

    fns = {"collective": collective, "peer_push": peer_push}
    row: dict = {"mismatch": float((peer_push().float() - collective().float()).abs().max()),
                 "MB_out_per_rank": x.numel() * x.element_size() * (size - 1) / size / 1e6}
    for name, fn in fns.items():
        for _ in range(3):
            fn()
        row[f"{name}_ms"] = median_ms(lambda fn=fn: [fn() for _ in range(10)], args.iters,
                                      group) / 10
    a = torch.randn(local, 1536, device=device, dtype=torch.bfloat16)
    w = torch.randn(6144, 1536, device=device, dtype=torch.bfloat16)

    def matmuls(fn=None) -> None:
        done = torch.cuda.Event()
        if fn is not None:
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(8):
                    fn()
            done.record(side)
        for _ in range(8):
            torch.nn.functional.linear(a, w)
        if fn is not None:
            torch.cuda.current_stream().wait_event(done)

    row["matmuls_alone_ms"] = median_ms(matmuls, args.iters, group)
    for name, fn in fns.items():
        row[f"matmuls_with_8_{name}_ms"] = median_ms(lambda fn=fn: matmuls(fn), args.iters,
                                                     group)
    return row


def main() -> None:
    args = parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    torch.manual_seed(rank)
    report: dict = {"device": torch.cuda.get_device_name(), "world": world, "sp": {}}
    side = torch.cuda.Stream()
    for size in (2, 4):
        if world % size:
            continue
        groups = [dist.new_group(list(range(g, g + size))) for g in range(0, world, size)]
        report["sp"][size] = measure(size, groups[rank // size], args, side)
        dist.barrier()
    if rank == 0:
        print(json.dumps(report, indent=2), flush=True)
        if args.json_out:
            args.json_out.write_text(json.dumps(report, indent=2))
    mismatches = [row["mismatch"] for row in report["sp"].values()]
    dist.destroy_process_group()
    if any(mismatches):
        raise SystemExit(f"peer_push differs from NCCL's all-to-all: max abs diff {mismatches}")


if __name__ == "__main__":
    main()
