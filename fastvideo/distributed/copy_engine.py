"""All-to-all on the GPUs' copy engines, through symmetric memory (one node, CUDA).

NCCL's all-to-all runs as a kernel that takes SMs away from the compute it overlaps; on
4 H100s (Wan 1.3B, sp=4) the element-wise kernels ran ~20% slower next to it. Here each
rank copies its send blocks into a slot of a buffer every rank of the group has mapped
(`torch.distributed._symmetric_memory`), all ranks meet at a barrier, and each rank pulls
its block from every peer with `cudaMemcpyAsync` (one stream per peer, so the copies run
on several copy engines at once). Only the barrier, a one-block kernel, uses SMs.

Slots rotate; a slot is written again only once every rank has passed the barrier of the
exchange after the one that used it, i.e. has finished pulling from it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_SLOT_ALIGN = 256  # bytes: keeps every slot aligned for any dtype and for the copy engines


class EventWork:
    """Stands for a `dist.Work`: `wait()` makes the current stream wait for the exchange."""

    __slots__ = ("_event",)

    def __init__(self, event: torch.cuda.Event) -> None:
        self._event = event

    @torch.compiler.disable  # Dynamo must not trace the event into a compiled graph
    def wait(self) -> bool:
        torch.cuda.current_stream().wait_event(self._event)
        return True


class CopyEngineAllToAll:
    """Exchanges `x[j]` with rank j of `group`, like `all_to_all_single`, without SMs.

    All ranks must start the same exchanges in the same order (SPMD). `num_slots` (>= 2)
    exchanges may be in flight before a slot is reused.
    """

    def __init__(self, group: dist.ProcessGroup, device: torch.device,
                 num_slots: int = 4) -> None:
        if device.type != "cuda":
            raise ValueError(f"the copy-engine all-to-all needs CUDA devices, got {device}")
        if num_slots < 2:
            raise ValueError(f"num_slots={num_slots} must be >= 2")
        self.group = group
        self.device = device
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.num_slots = num_slots
        self._comm_stream = torch.cuda.Stream(device)
        self._pull_streams = [torch.cuda.Stream(device) for _ in range(self.world_size)]
        self._heap: torch.Tensor | None = None
        self._handle = None
        self._slot_bytes = 0
        self._count = 0
        self._passed: dict[int, torch.cuda.Event] = {}
        """Exchange index -> event recorded once every rank passed its barrier."""
        self._peer_views: dict[tuple, torch.Tensor] = {}

    def start(self, x: torch.Tensor) -> tuple[torch.Tensor, EventWork]:
        """Start the exchange of `x` `[P, ...]` (any strides; block j goes to rank j).

        Returns the receive tensor (block j from rank j, contiguous, same shape) and a handle
        whose `wait()` orders the current stream after the transfer."""
        if x.shape[0] != self.world_size:
            raise ValueError(f"all-to-all input has {x.shape[0]} blocks along dim 0 for "
                             f"{self.world_size} ranks (shape {tuple(x.shape)})")
        nbytes = x.numel() * x.element_size()
        self._reserve(nbytes)
        index, slot = self._count, self._count % self.num_slots
        self._count += 1
        compute = torch.cuda.current_stream(self.device)
        freed = self._passed.pop(index - self.num_slots + 1, None)
        if freed is not None:  # every rank has pulled this slot's previous contents
            compute.wait_event(freed)
        self._local_view(slot, x.shape, x.dtype).copy_(x)
        out = torch.empty(x.shape, dtype=x.dtype, device=self.device)
        ready = torch.cuda.Event()
        ready.record(compute)

        comm = self._comm_stream
        comm.wait_event(ready)
        with torch.cuda.stream(comm):
            self._handle.barrier(channel=0)
        passed = torch.cuda.Event()
        passed.record(comm)
        self._passed[index] = passed
        block_shape, block_numel = x.shape[1:], x[0].numel()
        for peer, stream in enumerate(self._pull_streams):
            stream.wait_event(passed)
            with torch.cuda.stream(stream):
                out[peer].copy_(self._peer_view(peer, slot, block_shape, x.dtype, block_numel))
            out.record_stream(stream)
            pulled = torch.cuda.Event()
            pulled.record(stream)
            comm.wait_event(pulled)
        done = torch.cuda.Event()
        done.record(comm)
        return out, EventWork(done)

    def _reserve(self, nbytes: int) -> None:
        """Make every slot hold `nbytes`: (re)allocate and map the buffer, collectively."""
        if nbytes <= self._slot_bytes:
            return
        import torch.distributed._symmetric_memory as symm_mem

        if self._handle is not None:
            # Peers may still pull from the old buffer: wait for every rank to be done.
            torch.cuda.synchronize(self.device)
            self._handle.barrier(channel=0)
            torch.cuda.synchronize(self.device)
        slot_bytes = -(-nbytes // _SLOT_ALIGN) * _SLOT_ALIGN
        self._heap = symm_mem.empty(self.num_slots * slot_bytes, dtype=torch.uint8,
                                    device=self.device)
        self._handle = symm_mem.rendezvous(self._heap, self.group.group_name)
        self._slot_bytes = slot_bytes
        self._passed.clear()
        self._peer_views.clear()

    def _local_view(self, slot: int, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        start = slot * self._slot_bytes
        nbytes = shape.numel() * dtype.itemsize
        return self._heap[start:start + nbytes].view(dtype).view(shape)

    def _peer_view(self, peer: int, slot: int, block_shape: torch.Size, dtype: torch.dtype,
                   block_numel: int) -> torch.Tensor:
        """Our block of `peer`'s slot, mapped into this process."""
        key = (peer, slot, tuple(block_shape), dtype)
        view = self._peer_views.get(key)
        if view is None:
            offset = slot * self._slot_bytes // dtype.itemsize + self.rank * block_numel
            view = self._handle.get_buffer(peer, tuple(block_shape), dtype, offset)
            self._peer_views[key] = view
        return view
