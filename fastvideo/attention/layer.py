"""Attention layers the models call: `LocalAttention` and `DistributedAttention`.

Both take `[B, S, H, D]` query/key/value and return `[B, S, H, D]`. The backend is chosen
(`selector.get_attn_backend`) on the first call for each input dtype and device, since a
model is usually built in fp32 on one device and cast or moved afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastvideo.attention.backends.abstract import AttentionBackend, AttentionImpl, _Backend
from fastvideo.attention.metadata import AttentionMetadata, with_fields
from fastvideo.attention.selector import backend_from_name, get_attn_backend
from fastvideo.distributed.parallel_state import (
    GroupCoordinator,
    get_sp_group,
    get_sp_world_size,
)


class _AttentionLayer(nn.Module):

    def __init__(self, num_heads: int, head_size: int, softmax_scale: float | None = None,
                 causal: bool = False,
                 supported_attention_backends: Sequence[_Backend] = (_Backend.TORCH_SDPA,),
                 layer_idx: int | None = None, use_preferred_backends: bool = True) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.use_preferred_backends = use_preferred_backends
        """Whether a backend that declares itself faster on this device (`AttentionBackend.
        preferred`) goes ahead of `supported_attention_backends` when none was requested.
        Off for layers whose shapes the claim was not measured on (short key sequences)."""
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
        return self.impl_for(query.dtype, query.device)

    def request_backend(self, backend: _Backend | None) -> None:
        """Use `backend` (None: the default choice) from now on; the inputs already seen
        choose again at once, so no later trace has to."""
        chosen_for = list(self._impls)
        self.requested_backend = backend
        self._impls.clear()
        self._backends.clear()
        for dtype, device in chosen_for:
            self.impl_for(dtype, device)

    def impl_for(self, dtype: torch.dtype, device: torch.device) -> AttentionImpl:
        """The backend implementation for inputs of `dtype` on `device`, chosen once."""
        key = (dtype, device)
        impl = self._impls.get(key)
        if impl is None:
            backend = get_attn_backend(self.head_size, dtype, device,
                                       self.supported_attention_backends,
                                       requested=self.requested_backend,
                                       use_preferred=self.use_preferred_backends)
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
    is requested for the video self-attention). A layer that had already chosen for some
    input dtypes and devices chooses again for them at once (see
    `select_attention_backends`). Returns the number of layers changed; an unknown name
    raises `ValueError` listing the valid ones.
    """
    backend = backend_from_name(name)
    layers = [m for m in model.modules()
              if isinstance(m, _AttentionLayer) and backend in m.supported_attention_backends]
    for layer in layers:
        layer.request_backend(backend)
    return len(layers)


def attention_backends_in_use(model: nn.Module) -> dict[str, list[str]]:
    """The backends `model`'s attention layers were asked for and the ones they chose
    (for the inputs seen so far): how a caller checks an option reached the model."""
    layers = [m for m in model.modules() if isinstance(m, _AttentionLayer)]
    return {"requested": sorted({layer.requested_backend.name for layer in layers
                                 if layer.requested_backend is not None}),
            "chosen": sorted({backend.name.name for layer in layers
                              for backend in layer._backends.values()})}


def select_attention_backends(model: nn.Module, dtype: torch.dtype,
                              device: torch.device | str | None = None) -> int:
    """Make every attention layer of `model` choose its backend for `dtype` inputs now.

    Call it before `torch.compile` traces the model (`compile_repeated_blocks` does): a
    layer that chooses during the first trace breaks the compiled block's graph there for
    good, which costs fusions. `device`: where the inputs will be; by default where the
    model's parameters are. Returns the number of layers."""
    device = next(model.parameters()).device if device is None else torch.device(device)
    layers = [m for m in model.modules() if isinstance(m, _AttentionLayer)]
    for layer in layers:
        layer.impl_for(dtype, device)
    return len(layers)


class LocalAttention(_AttentionLayer):
    """Attention over the tokens this process holds (e.g. cross-attention to the text)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                lengths: Sequence[int] | None = None) -> torch.Tensor:
        """`lengths`: self-attention over padded sequences, item i's first `lengths[i]`
        tokens being real; its padding keys are never attended and its padding rows are
        zero. None: every token is real."""
        impl = self.get_impl(q)
        if lengths is None:
            return impl.forward(q, k, v)
        _check_lengths(lengths, q.shape[0], q.shape[1])
        return torch.cat([_attend_rows(impl, q[first:last, :n], k[first:last, :n],
                                       v[first:last, :n], n, q.shape[1])
                          for first, last, n in _equal_runs(lengths)])


class AppendedTokens(NamedTuple):
    """Tokens every sp rank holds in full (e.g. the text), attended jointly with the sharded
    sequence as if appended after it: q, k, v `[B, L, H, D]`, item i's first `lengths[i]`
    real (None: all `L`)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    lengths: Sequence[int] | None = None

    def items(self, first: int, last: int, heads: slice) -> AppendedTokens:
        """Batch items `[first, last)`, heads `heads`."""
        lengths = None if self.lengths is None else self.lengths[first:last]
        return AppendedTokens(*(x[first:last, :, heads] for x in (self.q, self.k, self.v)),
                              lengths)


class HeadExchange:
    """An all-to-all in flight, started by `DistributedAttention.scatter_heads`: this rank's
    tokens of every head go out, all tokens of this rank's heads come in.

    Pass it to `DistributedAttention.forward` in place of the tensor; it is waited on there,
    only when the attention needs it.
    """

    __slots__ = ("local_shape", "batch_bounds", "_parts")

    def __init__(self, local_shape: torch.Size, batch_bounds: Sequence[int],
                 parts: list[tuple[torch.Tensor, dist.Work]]) -> None:
        self.local_shape = local_shape
        """`[B, S_local, H, D]` of the tensor sent."""
        self.batch_bounds = tuple(batch_bounds)
        """Micro-batch m is batch items `[bounds[m], bounds[m + 1])`."""
        self._parts = parts
        """Per micro-batch: the receive buffer `[P, b, S_local, H/P, D]` (block j from rank
        j) and its collective's handle."""

    @property
    def buffer(self) -> torch.Tensor:
        """The first receive buffer, without waiting (for its dtype and device)."""
        return self._parts[0][0]

    def received(self, micro_batch: int) -> torch.Tensor:
        """Micro-batch `micro_batch`'s receive buffer, once it has arrived."""
        buffer, work = self._parts[micro_batch]
        work.wait()
        return buffer


AttentionInput = torch.Tensor | HeadExchange
"""A q, k or v for `DistributedAttention.forward`: the tensor, or its exchange started."""


class DistributedAttention(_AttentionLayer):
    """Attention over a token sequence sharded across the sequence-parallel (sp) group.

    Ulysses: an all-to-all turns this rank's block of tokens `[B, S/P, H, D]` into all tokens
    of a slice of the heads `[B, S, H/P, D]`, the backend attends over the whole sequence, and
    a second all-to-all turns the output back. Rank r holds heads `[r * H/P, (r + 1) * H/P)`.
    Two ways to hide the all-to-alls, both with asynchronous collectives on NCCL's stream:

    - `scatter_heads(x)` starts one input's exchange as soon as the model has computed it, so
      it runs while the model computes the next input (`forward` takes the handles).
    - `num_micro_batches` > 1 (the default, for batches of several items, e.g. the
      conditional and unconditional inputs of classifier-free guidance): the batch goes
      through in groups of items; while the backend attends one, the inputs of the next and
      the output of the previous are in flight, and every kernel stays as large as for one
      item.

    A sequence the model padded to a multiple of P tokens is cut back to its `valid_len`
    tokens once gathered, so padded keys are never attended and the backend runs unmasked.

    `forward_joint` also attends tokens every rank holds in full (a DiT's text), appended
    after the gathered sequence: each rank takes its own heads of them, and their output's
    heads are gathered afterwards.
    """

    def __init__(self, num_heads: int, head_size: int, softmax_scale: float | None = None,
                 causal: bool = False,
                 supported_attention_backends: Sequence[_Backend] = (_Backend.TORCH_SDPA,),
                 layer_idx: int | None = None, num_micro_batches: int = 2) -> None:
        super().__init__(num_heads, head_size, softmax_scale, causal,
                         supported_attention_backends, layer_idx)
        self.num_micro_batches = num_micro_batches
        """Groups of batch items to pipeline the all-to-alls over (capped at the batch
        size). 2 by default: a guidance pair on 4 H100s took 338.5 ms against 347.9 ms as
        one group (benchmarks/RESULTS.md)."""
        check_heads_divide(num_heads, get_sp_world_size())
        _check_micro_batches(num_micro_batches)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_micro_batches={self.num_micro_batches}"

    def scatter_heads(self, x: torch.Tensor) -> AttentionInput:
        """Start sending `x` `[B, S_local, H, D]` (this rank's block of the sequence) to the
        ranks that attend its heads; pass what it returns to `forward` in place of `x`.

        Called as soon as each of q, k, v is computed, the transfer runs while the model
        computes the next. With one sp rank there is nothing to send: `x` comes back.
        """
        if get_sp_world_size() == 1:
            return x
        return self._scatter((x,))[0]

    def forward(self, q: AttentionInput, k: AttentionInput, v: AttentionInput,
                valid_len: int | None = None,
                metadata: AttentionMetadata | None = None) -> torch.Tensor:
        """`q`, `k`, `v` `[B, S_local, H, D]`: this rank's contiguous block of a sequence of
        `P * S_local` tokens, as tensors or as `scatter_heads` handles. `valid_len`: how many
        of those are real (padding comes last); None: all. `metadata`: for the backend, its
        `head_offset` set here to this rank's first head. Returns `[B, S_local, H, D]`;
        rows of padding tokens are zero."""
        return self._forward(q, k, v, valid_len, None, metadata)[0]

    def forward_joint(self, q: AttentionInput, k: AttentionInput, v: AttentionInput,
                      appended: AppendedTokens, valid_len: int | None = None,
                      metadata: AttentionMetadata | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Joint attention of the sharded sequence (as in `forward`) and the `appended`
        tokens every rank holds in full, which sit after its `valid_len` real tokens: each
        rank attends its heads of both, so the appended tokens cost no all-to-all. Their
        padding (beyond `appended.lengths`) is never attended; its rows are zero.

        Returns the sequence's output `[B, S_local, H, D]` (as `forward`) and the appended
        tokens' output `[B, L, H, D]`, the same on every rank (heads gathered). A run of
        items with shorter `appended.lengths` gets `metadata` with its own text length."""
        batch, length = appended.q.shape[:2]
        if appended.lengths is not None:
            _check_lengths(appended.lengths, batch, length)
        video, text = self._forward(q, k, v, valid_len, appended, metadata)
        assert text is not None
        return video, text

    def _forward(self, q: AttentionInput, k: AttentionInput, v: AttentionInput,
                 valid_len: int | None, appended: AppendedTokens | None,
                 metadata: AttentionMetadata | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        num_ranks = get_sp_world_size()
        inputs = (q, k, v)
        if num_ranks == 1:
            if not all(isinstance(x, torch.Tensor) for x in inputs):
                raise ValueError("got a HeadExchange at sp size 1: it was started under "
                                 "another sp group; pass tensors")
            impl = self.get_impl(q)
            if appended is None:
                return _attend_valid(impl, q, k, v, valid_len, metadata), None
            return _attend_joint(impl, q, k, v, q.shape[1] if valid_len is None else valid_len,
                                 appended, metadata)
        shapes = [x.shape if isinstance(x, torch.Tensor) else x.local_shape for x in inputs]
        if len(set(shapes)) != 1:
            raise ValueError(f"q, k, v must have the same [B, S_local, H, D] shape for "
                             f"Ulysses attention, got {[tuple(s) for s in shapes]}")
        check_heads_divide(shapes[0][2], num_ranks)
        seq_len = num_ranks * shapes[0][1]
        if valid_len is not None and not 0 < valid_len <= seq_len:
            raise ValueError(f"valid_len={valid_len} outside (0, {seq_len}] for {num_ranks} "
                             f"sequence shards of {shapes[0][1]} tokens")
        # Tensors not yet sent go out together, part by part.
        started = iter(self._scatter([x for x in inputs if isinstance(x, torch.Tensor)]))
        exchanges = [next(started) if isinstance(x, torch.Tensor) else x for x in inputs]
        if len({x.batch_bounds for x in exchanges}) != 1:
            raise ValueError(
                "q, k, v were sent in different micro-batches "
                f"{[x.batch_bounds for x in exchanges]}: num_micro_batches changed between "
                "scatter_heads and forward")
        impl = self._sp_impl(exchanges[0].buffer, num_ranks)
        return _ulysses_attention(impl, exchanges, valid_len, get_sp_group(), appended,
                                  metadata)

    def _scatter(self, tensors: Sequence[torch.Tensor]) -> list[HeadExchange]:
        """Start the input all-to-alls of `tensors`, micro-batch by micro-batch: on NCCL's
        stream each then starts straight after the previous one, and the first attention
        waits for the fewest transfers."""
        if not tensors:
            return []
        num_ranks = get_sp_world_size()
        check_heads_divide(tensors[0].shape[2], num_ranks)
        self._sp_impl(tensors[0], num_ranks)
        _check_micro_batches(self.num_micro_batches)
        batch = tensors[0].shape[0]
        num_micro = min(self.num_micro_batches, batch)
        bounds = [m * batch // num_micro for m in range(num_micro + 1)]
        group = get_sp_group()
        parts: list[list[tuple[torch.Tensor, dist.Work]]] = [[] for _ in tensors]
        for first, end in zip(bounds, bounds[1:]):
            for x, sent in zip(tensors, parts):
                sent.append(_all_to_all(_heads_to_ranks(x[first:end], num_ranks), group))
        return [HeadExchange(x.shape, bounds, sent) for x, sent in zip(tensors, parts)]

    def _sp_impl(self, x: torch.Tensor, num_ranks: int) -> AttentionImpl:
        impl = self.get_impl(x)
        backend = self._backends.get((x.dtype, x.device))
        if backend is not None and not backend.supports_sequence_parallel:
            raise ValueError(f"attention backend {backend.name.name} does not support sequence "
                             f"parallelism (sp size {num_ranks}); choose another backend")
        return impl


def _check_micro_batches(num_micro_batches: int) -> None:
    if num_micro_batches < 1:
        raise ValueError(f"num_micro_batches={num_micro_batches} must be >= 1")


def check_heads_divide(num_heads: int, sp_size: int) -> None:
    """ValueError unless `num_heads` splits evenly over `sp_size` ranks (Ulysses needs it)."""
    if num_heads % sp_size:
        valid = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
        raise ValueError(f"{num_heads} attention heads cannot be split over a sequence "
                         f"parallel size of {sp_size}; sp sizes that work: {valid}")


def _for_impl(impl: AttentionImpl, metadata: AttentionMetadata | None,
              **changes: object) -> AttentionMetadata | None:
    """`metadata` with `changes` for a backend that reads it; as is for the others, whose
    compiled graphs then need no break for the update."""
    if metadata is None or not impl.uses_metadata:
        return metadata
    return with_fields(metadata, **changes)


def _attend_rows(impl: AttentionImpl, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 valid_rows: int, num_rows: int | None = None,
                 metadata: AttentionMetadata | None = None) -> torch.Tensor:
    """Attention of the first `valid_rows` queries to all of `k`, `v`, zero-padded to
    `num_rows` rows (None: `q`'s)."""
    num_rows = q.shape[1] if num_rows is None else num_rows
    if valid_rows == num_rows == q.shape[1]:
        return impl.forward(q, k, v, metadata)
    if valid_rows == 0:  # kernels may reject empty queries
        return q.new_zeros(q.shape[0], num_rows, *q.shape[2:])
    return _pad_rows(impl.forward(q[:, :valid_rows], k, v, metadata), num_rows)


def _pad_rows(x: torch.Tensor, num_rows: int) -> torch.Tensor:
    """`x` `[B, S, H, D]` zero-padded to `num_rows` rows."""
    return x if x.shape[1] == num_rows else F.pad(x, (0, 0, 0, 0, 0, num_rows - x.shape[1]))


def _check_lengths(lengths: Sequence[int], batch: int, num_tokens: int) -> None:
    if len(lengths) != batch or not all(0 < n <= num_tokens for n in lengths):
        raise ValueError(f"lengths {list(lengths)} must be {batch} values in "
                         f"[1, {num_tokens}] (one per batch item)")


def _equal_runs(lengths: Sequence[int]) -> list[tuple[int, int, int]]:
    """`(first, last, n)` for each run of consecutive batch items sharing the length `n`:
    each run attends in one call (all items at once when no item is padded differently)."""
    runs: list[tuple[int, int, int]] = []
    for i, n in enumerate(lengths):
        if runs and runs[-1][2] == n:
            runs[-1] = (runs[-1][0], i + 1, n)
        else:
            runs.append((i, i + 1, n))
    return runs


def _attend_joint(impl: AttentionImpl, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  valid_rows: int, appended: AppendedTokens,
                  metadata: AttentionMetadata | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over `[q[:valid_rows], appended.q[:n_i]]` (keys and values alike) for item
    i: the sequence `[B, S, h, D]` and the appended tokens `[B, L, h, D]` of the same heads.
    Returns both outputs, padding rows zero."""
    num_rows, num_appended = q.shape[1], appended.q.shape[1]
    lengths = appended.lengths or [num_appended] * q.shape[0]
    outs, appended_outs = [], []
    for first, last, n in _equal_runs(lengths):
        query, key, value = (torch.cat([x[first:last, :valid_rows], y[first:last, :n]], dim=1)
                             for x, y in ((q, appended.q), (k, appended.k), (v, appended.v)))
        # The DiT set the appended (text) token count for the full length; this run may
        # have fewer.
        out = impl.forward(query, key, value, metadata if n == num_appended
                           else _for_impl(impl, metadata, num_text_tokens=n))
        outs.append(_pad_rows(out[:, :valid_rows], num_rows))
        appended_outs.append(_pad_rows(out[:, valid_rows:], num_appended))
    if len(outs) == 1:
        return outs[0], appended_outs[0]
    return torch.cat(outs), torch.cat(appended_outs)


def _attend_valid(impl: AttentionImpl, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  valid_len: int | None, metadata: AttentionMetadata | None) -> torch.Tensor:
    """Attention over the first `valid_len` tokens; padding rows of the output are zero."""
    if valid_len is None or valid_len == q.shape[1]:
        return impl.forward(q, k, v, metadata)
    return _attend_rows(impl, q, k[:, :valid_len], v[:, :valid_len], valid_len,
                        metadata=metadata)


def _heads_to_ranks(x: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """`[B, S/P, H, D]` -> a `[P, B, S/P, H/P, D]` view, block j holding rank j's heads; the
    exchange copies it into its send buffer, the one copy on the way out."""
    batch, local_len, num_heads, head_size = x.shape
    split = x.reshape(batch, local_len, num_ranks, num_heads // num_ranks, head_size)
    return split.permute(2, 0, 1, 3, 4)


@torch.compiler.disable  # streams, events and async collectives: kept out of graphs
def _all_to_all(x: torch.Tensor, group: GroupCoordinator) -> tuple[torch.Tensor, dist.Work]:
    """Start exchanging blocks `x[j]` (any strides) with rank j; returns the receive buffer
    and its handle."""
    return group.start_all_to_all(x)


def _full_sequence(buffer: torch.Tensor) -> torch.Tensor:
    """Received `[P, B, S/P, h, D]` in rank (= sequence block) order -> `[B, S, h, D]`; a view
    at B = 1."""
    num_ranks, batch, local_len, heads, head_size = buffer.shape
    return buffer.transpose(0, 1).reshape(batch, num_ranks * local_len, heads, head_size)


def _ulysses_attention(impl: AttentionImpl, inputs: Sequence[HeadExchange],
                       valid_len: int | None, group: GroupCoordinator,
                       appended: AppendedTokens | None = None,
                       metadata: AttentionMetadata | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The sequence's output and, when tokens are `appended`, theirs with the heads
    gathered from every rank."""
    q, k, v = inputs
    num_ranks = group.world_size
    batch, local_len, num_heads, head_size = q.local_shape
    heads = num_heads // num_ranks
    kv_len = num_ranks * local_len if valid_len is None else valid_len
    first_head = group.rank_in_group * heads
    metadata = _for_impl(impl, metadata, head_offset=first_head)

    pending = []
    # This rank's heads of the appended tokens' output, per micro-batch.
    appended_outs: list[torch.Tensor] = []
    micro_batches = list(zip(q.batch_bounds, q.batch_bounds[1:]))
    for micro, (first, last) in enumerate(micro_batches):
        query, key, value = (_full_sequence(x.received(micro)) for x in (q, k, v))
        # Real tokens are a prefix of the sequence: the first kv_len rows.
        if appended is None:
            out = _attend_rows(impl, query, key[:, :kv_len], value[:, :kv_len], kv_len,
                               metadata=metadata)
        else:
            out, appended_out = _attend_joint(
                impl, query, key[:, :kv_len], value[:, :kv_len], kv_len,
                appended.items(first, last, slice(first_head, first_head + heads)), metadata)
            appended_outs.append(appended_out)
        # [b, P * S/P, h, D] -> [P, b, S/P, h, D]: block j goes back to rank j.
        send = out.reshape(last - first, num_ranks, local_len, heads, head_size).transpose(0, 1)
        pending.append((first, last, _all_to_all(send, group)))

    # Waited for only now: each output exchange overlaps the attention queued after it.
    result = q.buffer.new_empty(batch, local_len, num_ranks, heads, head_size)
    for first, last, (buffer, work) in pending:
        work.wait()
        # Received from rank j: its heads, for our tokens.
        result[first:last] = buffer.permute(1, 2, 0, 3, 4)
    result = result.view(batch, local_len, num_heads, head_size)
    if appended is None:
        return result, None
    # [B, L, H/P, D] on each rank -> [B, L, H, D] in head order, the same on every rank.
    return result, group.all_gather(torch.cat(appended_outs), dim=2)
