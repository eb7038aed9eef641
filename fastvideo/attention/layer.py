"""Attention layers the models call: `LocalAttention` and `DistributedAttention`.

Both take `[B, S, H, D]` query/key/value and return `[B, S, H, D]`. The backend is chosen
(`selector.get_attn_backend`) on the first call for each input dtype and device, since a
model is usually built in fp32 on one device and cast or moved afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from fastvideo.attention.backends.abstract import AttentionBackend, AttentionImpl, _Backend
from fastvideo.attention.selector import backend_from_name, get_attn_backend
from fastvideo.distributed.parallel_state import get_sp_group, get_sp_world_size

# Backends that treat every head alike, so heads may be attended in any grouping and the
# all-to-all can be pipelined over head chunks. Sliding tile reads a head's window from its
# global index, which it derives from the sp rank assuming one contiguous slice of heads.
_HEAD_AGNOSTIC_BACKENDS = frozenset({_Backend.TORCH_SDPA, _Backend.FLASH_ATTN})


class _AttentionLayer(nn.Module):

    def __init__(self, num_heads: int, head_size: int, softmax_scale: float | None = None,
                 causal: bool = False,
                 supported_attention_backends: Sequence[_Backend] = (_Backend.TORCH_SDPA,),
                 layer_idx: int | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        if not supported_attention_backends:
            raise ValueError("supported_attention_backends is empty")
        self.num_heads = num_heads
        self.head_size = head_size
        self.softmax_scale = softmax_scale
        self.causal = causal
        self.supported_attention_backends = tuple(supported_attention_backends)
        self.requested_backend: _Backend | None = None
        """Set by `request_attention_backend` (the engine's `attention_backend` option)."""
        self._impls: dict[tuple[torch.dtype, torch.device], AttentionImpl] = {}
        self._backends: dict[tuple[torch.dtype, torch.device], AttentionBackend] = {}

    def get_impl(self, query: torch.Tensor) -> AttentionImpl:
        """The backend implementation for `query`'s dtype and device, chosen once per pair."""
        key = (query.dtype, query.device)
        impl = self._impls.get(key)
        if impl is None:
            backend = get_attn_backend(self.head_size, query.dtype, query.device,
                                       self.supported_attention_backends,
                                       requested=self.requested_backend)
            impl = backend.impl_cls(self.num_heads, self.head_size, self.softmax_scale,
                                    self.causal, layer_idx=self.layer_idx)
            self._impls[key] = impl
            self._backends[key] = backend
        return impl

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_size={self.head_size}, causal={self.causal}, "
                f"backends={[b.name for b in self.supported_attention_backends]}")


def request_attention_backend(model: nn.Module, name: str | _Backend) -> int:
    """Ask every attention layer of `model` that supports backend `name` to use it.

    Layers that don't list it keep their default (cross-attention, say, when sliding tile
    is requested for the video self-attention). Returns the number of layers changed;
    an unknown name raises `ValueError` listing the valid ones.
    """
    backend = backend_from_name(name)
    layers = [m for m in model.modules()
              if isinstance(m, _AttentionLayer) and backend in m.supported_attention_backends]
    for layer in layers:
        layer.requested_backend = backend
        layer._impls.clear()
        layer._backends.clear()
    return len(layers)


class LocalAttention(_AttentionLayer):
    """Attention over the tokens this process holds (e.g. cross-attention to the text)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.get_impl(q).forward(q, k, v)


class DistributedAttention(_AttentionLayer):
    """Attention over a token sequence sharded across the sequence-parallel (sp) group.

    Ulysses: an all-to-all turns this rank's block of tokens `[B, S/P, H, D]` into all tokens
    of a slice of the heads `[B, S, H/P, D]`, the backend attends over the whole sequence, and
    a second all-to-all turns the output back. With `num_chunks` > 1 the heads go through in
    groups, with asynchronous collectives: while the backend attends one group, the inputs of
    the next groups and the output of the previous are in flight on NCCL's stream.
    Rank r holds heads `[r * H/P, (r + 1) * H/P)`, as in plain Ulysses, whatever the chunking.

    A sequence the model padded to a multiple of P tokens is cut back to its `valid_len`
    tokens once gathered, so padded keys are never attended and the backend runs unmasked.
    """

    def __init__(self, num_heads: int, head_size: int, softmax_scale: float | None = None,
                 causal: bool = False,
                 supported_attention_backends: Sequence[_Backend] = (_Backend.TORCH_SDPA,),
                 num_chunks: int = 1, layer_idx: int | None = None) -> None:
        super().__init__(num_heads, head_size, softmax_scale, causal,
                         supported_attention_backends, layer_idx)
        self.num_chunks = num_chunks
        """Head groups to pipeline the all-to-all over; must divide the heads per rank.
        Backends that index heads (sliding tile) always get one. 1 by default: on 2 and 4
        H200s (Wan 1.3B, bench_dit_sp.py) 2 or 3 groups were 1-3% slower than one, as
        NCCL's kernels then compete with the attention kernels for SMs."""
        check_heads_divide(num_heads, get_sp_world_size())

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                valid_len: int | None = None) -> torch.Tensor:
        """`q`, `k`, `v` `[B, S_local, H, D]`: this rank's contiguous block of a sequence of
        `P * S_local` tokens. `valid_len`: how many of those are real (padding comes last);
        None: all. Returns `[B, S_local, H, D]`; rows of padding tokens are zero."""
        num_ranks = get_sp_world_size()
        impl = self.get_impl(q)
        if num_ranks == 1:
            return _attend_valid(impl, q, k, v, valid_len)
        check_heads_divide(q.shape[2], num_ranks)
        seq_len = num_ranks * q.shape[1]
        if valid_len is not None and not 0 < valid_len <= seq_len:
            raise ValueError(f"valid_len={valid_len} outside (0, {seq_len}] for {num_ranks} "
                             f"sequence shards of {q.shape[1]} tokens")
        backend = self._backends.get((q.dtype, q.device))
        if backend is not None and not backend.supports_sequence_parallel:
            raise ValueError(f"attention backend {backend.name.name} does not support sequence "
                             f"parallelism (sp size {num_ranks}); choose another backend")
        num_chunks = self._chunks_for(impl, backend, q.shape[2] // num_ranks)
        return _ulysses_attention(impl, q, k, v, valid_len, num_chunks,
                                  get_sp_group().device_group)

    def _chunks_for(self, impl: AttentionImpl, backend: AttentionBackend | None,
                    heads_per_rank: int) -> int:
        # `type(impl)` also catches a wrapped impl (e.g. the STA window search's) that
        # records per-head results by head position.
        if (backend is None or backend.name not in _HEAD_AGNOSTIC_BACKENDS
                or type(impl) is not backend.impl_cls):
            return 1
        if self.num_chunks < 1 or heads_per_rank % self.num_chunks:
            raise ValueError(f"num_chunks={self.num_chunks} must divide the {heads_per_rank} "
                             "heads each sequence parallel rank attends")
        return self.num_chunks


def check_heads_divide(num_heads: int, sp_size: int) -> None:
    """ValueError unless `num_heads` splits evenly over `sp_size` ranks (Ulysses needs it)."""
    if num_heads % sp_size:
        valid = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
        raise ValueError(f"{num_heads} attention heads cannot be split over a sequence "
                         f"parallel size of {sp_size}; sp sizes that work: {valid}")


def _attend_valid(impl: AttentionImpl, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  valid_len: int | None) -> torch.Tensor:
    """Attention over the first `valid_len` tokens; padding rows of the output are zero."""
    seq_len = q.shape[1]
    if valid_len is None or valid_len == seq_len:
        return impl.forward(q, k, v)
    out = impl.forward(q[:, :valid_len], k[:, :valid_len], v[:, :valid_len])
    return torch.nn.functional.pad(out, (0, 0, 0, 0, 0, seq_len - valid_len))


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup) -> tuple[torch.Tensor, dist.Work]:
    """Start exchanging blocks `x[j]` with rank j; returns the receive buffer and its handle."""
    out = torch.empty_like(x)
    return out, dist.all_to_all_single(out, x, group=group, async_op=True)


def _ulysses_attention(impl: AttentionImpl, q: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor, valid_len: int | None, num_chunks: int,
                       group: dist.ProcessGroup) -> torch.Tensor:
    num_ranks = dist.get_world_size(group)
    batch, local_len, num_heads, head_size = q.shape
    seq_len = num_ranks * local_len
    heads = num_heads // num_ranks // num_chunks
    # Head h sits at [rank, chunk, head in chunk]: rank r's heads are one contiguous slice.
    split = (batch, local_len, num_ranks, num_chunks, heads, head_size)

    def send_inputs(chunk: int) -> list[tuple[torch.Tensor, dist.Work]]:
        # [B, S/P, P, h, D] -> [P, B, S/P, h, D]: block j (its heads j) goes to rank j.
        return [_all_to_all(x.reshape(split)[:, :, :, chunk].permute(2, 0, 1, 3, 4)
                            .contiguous(), group) for x in (q, k, v)]

    def full_sequence(received: tuple[torch.Tensor, dist.Work]) -> torch.Tensor:
        buffer, work = received
        work.wait()
        # [P, B, S/P, h, D] in rank (= sequence block) order -> [B, S, h, D]; a view at B=1.
        return buffer.transpose(0, 1).reshape(batch, seq_len, heads, head_size)

    # Every input exchange is queued first: on the NCCL stream each then starts straight
    # after the previous one, before the attention waiting for that previous one. Queued
    # behind an output exchange (which waits for an attention) it would stall the pipeline.
    pending_inputs = [send_inputs(chunk) for chunk in range(num_chunks)]
    pending_outputs = []
    for inputs in pending_inputs:
        out = _attend_valid(impl, *(full_sequence(x) for x in inputs), valid_len)
        # [B, S, h, D] -> [P, B, S/P, h, D]: sequence block j goes back to rank j.
        send = out.reshape(batch, num_ranks, local_len, heads, head_size).transpose(0, 1)
        pending_outputs.append(_all_to_all(send.contiguous(), group))

    result = q.new_empty(split)
    for chunk, (buffer, work) in enumerate(pending_outputs):
        work.wait()
        # Received from rank j: its heads of this chunk, for this rank's tokens.
        result[:, :, :, chunk] = buffer.permute(1, 2, 0, 3, 4)
    return result.view(batch, local_len, num_heads, head_size)
