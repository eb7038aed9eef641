"""All-to-all by direct stores into the peers' memory (one node, CUDA symmetric memory).

NCCL's all-to-all first copies the send blocks into a contiguous buffer, then moves them
through its own FIFOs. Here every rank of the group maps the same receive slots
(`torch.distributed._symmetric_memory`), one Triton kernel reads the send tensor once, in
any strides, and stores each block straight into the slot of the rank it is for; then all
ranks meet at a barrier, after which each rank's slot holds block j from rank j, exactly
what `all_to_all_single` returns. On 4 H100s, for one of Wan-1.3B's 480p attention inputs
(benchmarks/bench_all_to_all.py), it takes 0.10 ms where NCCL takes 0.19 at sp=2 (0.11 and
0.20 at sp=4), and slows matmuls running beside it about half as much.

Both the stores and the barrier run on a side stream, which first waits for the caller's
stream, so the caller computes on meanwhile, as with NCCL's stream.

Slot reuse. A receive buffer is the caller's until it calls `release()`, once it has queued
its last read of it. A slot released before exchange m started may take any exchange after
m without more ado: every rank runs the same program (SPMD), so each released it before
exchange m too; exchange m's stores wait for all of that rank's queued work, every rank
waits at m's barrier for all ranks' stores, and our stream has passed that barrier before
it stores into the slot again. A slot released only after the last exchange started needs
that barrier first (one more barrier). With none released, a new slot is allocated, which
every rank does at the same point, as allocation is collective.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

MAX_SLOTS = 32
"""Receive buffers in use at once before `start` raises (Wan holds 4, 8 with guidance
micro-batches); unreleased buffers are a bug in the caller."""

_WORD_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


@dataclasses.dataclass(eq=False)
class _Slot:
    nbytes: int
    heap: torch.Tensor | None = None
    """This rank's receive buffer, bytes."""
    handle: Any = None
    """Its symmetric-memory handle (peer addresses, barrier)."""
    ptrs: torch.Tensor | None = None
    """int64 addresses of every rank's buffer, on the device, for the kernel."""
    released_at: int | None = None
    """`SlotPool.started` when released; None while the caller holds it."""


class SlotPool:
    """Which receive slot each exchange takes (the policy in the module docstring).

    `allocate(nbytes)` makes a new slot (on every rank: it is called at the same point of
    the program everywhere, since the policy depends only on the order of calls)."""

    def __init__(self, allocate: Callable[[int], _Slot], max_slots: int = MAX_SLOTS) -> None:
        self._allocate = allocate
        self.max_slots = max_slots
        self.started = 0
        """Exchanges started so far."""
        self.slots: list[_Slot] = []
        self.retired: list[_Slot] = []
        """Slots too small for later exchanges: kept (mapped), never reused."""

    def take(self, nbytes: int) -> tuple[_Slot, bool]:
        """A slot of at least `nbytes` for the next exchange, and whether the stores into it
        must wait for a barrier first (its release is not yet certified on every rank)."""
        self.started += 1
        free = [s for s in self.slots if s.released_at is not None]
        fits = [s for s in free if s.nbytes >= nbytes]
        certified = [s for s in fits if s.released_at < self.started - 1]
        if fits:
            slot = (certified or fits)[0]
            needs_barrier = not certified
            slot.released_at = None
            return slot, needs_barrier
        if len(self.slots) >= self.max_slots:
            if not free:
                raise RuntimeError(f"all {self.max_slots} receive buffers of the peer-push "
                                   "all-to-all are in use: a caller never released its own")
            self.slots.remove(free[0])  # too small for this exchange
            self.retired.append(free[0])
        slot = self._allocate(-(-nbytes // 4096) * 4096)
        self.slots.append(slot)
        return slot, False

    def release(self, slot: _Slot) -> None:
        """The caller has queued its last read of `slot`."""
        if slot.released_at is not None:
            raise RuntimeError("peer-push receive buffer released twice")
        slot.released_at = self.started


class PushWork:
    """Handle of one exchange: `wait()` before reading the receive buffer, `release()` once
    the last read is queued."""

    __slots__ = ("_owner", "_slot", "_done")

    def __init__(self, owner: PeerPushAllToAll, slot: _Slot, done: torch.cuda.Event) -> None:
        self._owner = owner
        self._slot = slot
        self._done = done

    @torch.compiler.disable  # events stay out of compiled graphs
    def wait(self) -> bool:
        torch.cuda.current_stream().wait_event(self._done)
        return True

    @torch.compiler.disable  # Python state, kept out of compiled graphs
    def release(self) -> None:
        self._owner.release(self._slot)


def block_layout(x: torch.Tensor, word_size: int) -> tuple[int, ...] | None:
    """`(peers, nb, rows, cols, peer stride, b stride, row stride)` of `x` `[P, ...]`'s blocks
    in `word_size`-byte words (cols contiguous), or None when they don't fit three strided
    dims of whole words (the caller then makes `x` contiguous)."""
    item = x.element_size()
    if x.dim() < 2 or x.stride(-1) != 1 or (x.shape[-1] * item) % word_size:
        return None
    if x.data_ptr() % word_size or any((s * item) % word_size for s in x.stride()[:-1]):
        return None
    # Merge the block's dims from the innermost out while they are one strided run.
    groups = [[x.shape[-1] * item // word_size, 1]]  # [size, stride] in words
    for size, stride in zip(reversed(x.shape[1:-1]), reversed(x.stride()[1:-1])):
        stride = stride * item // word_size
        if size == 1:
            continue
        if stride == groups[-1][0] * groups[-1][1]:
            groups[-1][0] *= size
        else:
            groups.append([size, stride])
    if len(groups) > 3:
        return None
    if len(groups) == 1:  # one contiguous run: rows of up to 256 words
        words = groups[0][0]
        cols = next(c for c in (256, 128, 64, 32, 16, 8, 4, 2, 1) if words % c == 0)
        groups = [[cols, 1], [words // cols, cols]]
    (cols, _), (rows, row_stride), (nb, b_stride) = (groups + [[1, 0], [1, 0]])[:3]
    return (x.shape[0], nb, rows, cols, x.stride(0) * item // word_size, b_stride, row_stride)


class PeerPushAllToAll:
    """`start(x)`: send block `x[j]` (any strides) to rank j of `group`, like
    `all_to_all_single`, by stores into the peers' receive slots. CUDA, one node."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device,
                 inline: bool = False) -> None:
        self.inline = inline
        """Store on the caller's stream (no overlap, no competition for SMs)."""
        if device.type != "cuda":
            raise ValueError(f"the peer-push all-to-all needs CUDA devices, got {device}")
        self.group = group
        self.device = device
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._pool = SlotPool(self._allocate)
        self._stream = torch.cuda.Stream(device)

    def start(self, x: torch.Tensor) -> tuple[torch.Tensor, PushWork]:
        """Start the exchange; returns this rank's receive buffer (contiguous, `x`'s shape and
        dtype, block j from rank j) and its handle."""
        if x.shape[0] != self.world_size:
            raise ValueError(f"all-to-all input has {x.shape[0]} blocks along dim 0 for "
                             f"{self.world_size} ranks (shape {tuple(x.shape)})")
        shape = x.shape
        if x.dim() == 1:
            x = x.unsqueeze(1)
        word_size, layout = _word_layout(x)
        if layout is None:
            x = x.contiguous()
            word_size, layout = _word_layout(x)
        nbytes = x.numel() * x.element_size()
        slot, needs_barrier = self._pool.take(nbytes)

        from fastvideo.distributed.push_kernel import push_blocks

        compute = torch.cuda.current_stream(self.device)
        stream = compute if self.inline else self._stream
        if not self.inline:
            stream.wait_stream(compute)  # x ready, reads queued
            x.record_stream(stream)
        with torch.cuda.stream(stream):
            if needs_barrier:  # the peers' last reads of this slot are not yet certified
                slot.handle.barrier(channel=0)
            block_words = nbytes // self.world_size // word_size
            push_blocks(x.view(_WORD_DTYPES[word_size]), layout, slot.ptrs,
                        self.rank * block_words)
            slot.handle.barrier(channel=0)
        done = torch.cuda.Event()
        done.record(stream)
        out = slot.heap[:nbytes].view(x.dtype).view(shape)
        return out, PushWork(self, slot, done)

    def release(self, slot: _Slot) -> None:
        self._pool.release(slot)

    def _allocate(self, nbytes: int) -> _Slot:
        """A new slot on every rank (collective: all ranks allocate at the same point)."""
        import torch.distributed._symmetric_memory as symm_mem

        heap = symm_mem.empty(nbytes, dtype=torch.uint8, device=self.device)
        handle = symm_mem.rendezvous(heap, self.group.group_name)
        offset = heap.data_ptr() - handle.buffer_ptrs[self.rank]
        ptrs = torch.tensor([p + offset for p in handle.buffer_ptrs], dtype=torch.int64,
                            device=self.device)
        return _Slot(nbytes, heap, handle, ptrs)


def _word_layout(x: torch.Tensor) -> tuple[int, tuple[int, ...] | None]:
    """The widest word (at least an element) `x`'s blocks move in, and their layout."""
    for word_size in (8, 4, 2, 1):
        if word_size < x.element_size():
            break
        layout = block_layout(x, word_size)
        if layout is not None:
            return word_size, layout
    return x.element_size(), None
