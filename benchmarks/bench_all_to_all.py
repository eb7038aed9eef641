"""What a Ulysses exchange costs the compute it overlaps (Wan-1.3B, 480p, NCCL).

    torchrun --nproc-per-node 4 benchmarks/bench_all_to_all.py --json-out a2a.json

For sp sizes 2 and 4 (subgroups of the torchrun world), with one exchange being the head
blocks of a `[1, S/P, H, D]` bf16 tensor (S = 32760 tokens, H = 12 heads, D = 128) as
`DistributedAttention` sends q, k or v (send copy + NCCL `all_to_all_single`), it times:

- one exchange alone, and q, k, v as one message (as the removed
  `DistributedAttention.pack_inputs` sent them);
- eight matmuls of the DiT's size (`[S/P, 1536] x [1536, 6144]`) alone, and with eight
  exchanges in flight on a side stream: an overlapped exchange is free only if the second
  time equals the first;
- the same with cuBLAS kept off some SMs (`--carveouts`, torch's experimental SM carveout),
  so NCCL's kernels find SMs free;
- one self-attention of this rank's heads over the whole sequence (FlashAttention's CuTe
  kernel, where installed), alone and with eight exchanges in flight.

Times are the slowest rank's, median over `--iters`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from bench_dit import sm_carveout  # the script's folder is on sys.path

from fastvideo.attention.layer import _heads_to_ranks


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=32760)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-size", type=int, default=128)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--carveouts", default="8,16,24,32",
                        type=lambda v: [int(c) for c in v.split(",") if c],
                        help="SMs kept from cuBLAS matmuls, one overlap measurement each")
    parser.add_argument("--json-out", type=Path)
    return parser.parse_args()


def median_ms(fn: Callable[[], object], iters: int, group: dist.ProcessGroup) -> float:
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


def overlapped(compute: Callable[[], object], exchange: Callable[[], object] | None,
               side: torch.cuda.Stream) -> None:
    """`compute` on the current stream while eight `exchange`s run on `side`."""
    if exchange is None:
        compute()
        return
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(8):
            exchange()
    compute()
    torch.cuda.current_stream().wait_stream(side)


def measure(size: int, group: dist.ProcessGroup, args: argparse.Namespace,
            side: torch.cuda.Stream) -> dict:
    local = args.tokens // size
    device = torch.device("cuda")
    x = torch.randn(1, local, args.heads, args.head_size, device=device, dtype=torch.bfloat16)

    def head_blocks(t: torch.Tensor) -> torch.Tensor:  # as DistributedAttention sends them
        return _heads_to_ranks(t, size)

    def send(blocks: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(blocks)
        dist.all_to_all_single(out, blocks, group=group)
        return out

    def exchange() -> torch.Tensor:
        return send(head_blocks(x).contiguous())

    def packed_exchange() -> torch.Tensor:  # q, k, v in one message (the removed pack_inputs)
        return send(torch.stack([head_blocks(x)] * 3, dim=3))

    a = torch.randn(local, 1536, device=device, dtype=torch.bfloat16)
    w = torch.randn(6144, 1536, device=device, dtype=torch.bfloat16)

    def matmuls() -> None:
        for _ in range(8):
            torch.nn.functional.linear(a, w)

    def steady_ms(fn: Callable[[], object]) -> float:
        """Per call, ten back to back: the steady rate, not one launch's latency."""
        return median_ms(lambda: [fn() for _ in range(10)], args.iters, group) / 10

    for _ in range(3):
        exchange()
    row: dict = {"MB_out_per_rank": x.numel() * x.element_size() * (size - 1) / size / 1e6,
                 "exchange_ms": steady_ms(exchange)}
    row["8_exchanges_serial_ms"] = 8 * row["exchange_ms"]
    row["3_exchanges_serial_ms"] = 3 * row["exchange_ms"]
    row["packed_exchange_of_3_ms"] = steady_ms(packed_exchange)
    for carveout in [None, *args.carveouts]:
        name = "matmuls" if carveout is None else f"carveout{carveout}_matmuls"
        with sm_carveout(carveout):
            row[f"{name}_alone_ms"] = median_ms(lambda: overlapped(matmuls, None, side),
                                                args.iters, group)
            row[f"{name}_with_8_exchanges_ms"] = median_ms(
                lambda: overlapped(matmuls, exchange, side), args.iters, group)
    try:
        from fastvideo.attention.backends.flash_cute import flash_cute_attention

        q = torch.randn(1, args.tokens, args.heads // size, args.head_size, device=device,
                        dtype=torch.bfloat16)
        scale = args.head_size**-0.5
        flash_cute_attention(q, q, q, scale, False)
    except (ImportError, RuntimeError) as error:
        row["attention_skipped"] = repr(error)[:200]
        return row

    def attention() -> None:
        flash_cute_attention(q, q, q, scale, False)

    row["attention_alone_ms"] = median_ms(lambda: overlapped(attention, None, side),
                                          args.iters, group)
    row["attention_with_8_exchanges_ms"] = median_ms(
        lambda: overlapped(attention, exchange, side), args.iters, group)
    return row


def main() -> None:
    args = parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    torch.manual_seed(rank)
    report: dict = {"device": torch.cuda.get_device_name(), "world": world,
                    "nccl": ".".join(map(str, torch.cuda.nccl.version())), "sp": {}}
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
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
