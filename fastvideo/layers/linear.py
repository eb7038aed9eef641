"""Linear layers. Each owns a `weight_loader` that takes the full checkpoint tensor.

The parallel layers shard `weight` (`[output_size, input_size]`, as in `nn.Linear`) over the
tensor parallel (tp) group: column parallel along the output features, row parallel along the
input features. With a tp size of 1 (or no set-up at all) they equal `nn.Linear`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fastvideo.distributed import (
    divide,
    get_tp_rank,
    get_tp_world_size,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)


def _load_shard(param_shard: torch.Tensor, loaded_weight: torch.Tensor, dim: int = 0,
                shard_index: int = 0, num_shards: int = 1) -> None:
    """Copy block `shard_index` of `loaded_weight`, cut into `num_shards` along `dim`.

    `loaded_weight` is the full checkpoint tensor; its shape is checked before slicing so a
    wrong checkpoint fails loudly instead of loading a misaligned slice.
    """
    expected = list(param_shard.shape)
    expected[dim] *= num_shards
    if list(loaded_weight.shape) != expected:
        split = (f" (expected the full tensor {tuple(expected)}, split {num_shards} ways along "
                 f"dim {dim})" if num_shards > 1 else "")
        raise ValueError(f"shape mismatch: parameter {tuple(param_shard.shape)}, "
                         f"checkpoint {tuple(loaded_weight.shape)}{split}")
    size = param_shard.shape[dim]
    param_shard.copy_(loaded_weight.narrow(dim, shard_index * size, size))


class LinearBase(nn.Module):
    """What every linear layer shares: its (possibly sharded) parameters, each carrying the
    layer's `weight_loader`, which receives the full checkpoint tensor."""

    def _create_params(self, weight_rows: int, weight_cols: int, bias_size: int, bias: bool,
                       params_dtype: torch.dtype | None) -> None:
        self.weight = nn.Parameter(torch.empty(weight_rows, weight_cols, dtype=params_dtype))
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(bias_size, dtype=params_dtype))
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)


class ReplicatedLinear(LinearBase):
    """A linear layer whose weights are the same on every rank (no sharding)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True,
                 params_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self._create_params(output_size, input_size, output_size, bias, params_dtype)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        _load_shard(param.data, loaded_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.input_size}, out_features={self.output_size}, bias={self.bias is not None}"


class ColumnParallelLinear(LinearBase):
    """`Y = X A^T` with `A` split by output features: each rank computes its slice of `Y`.

    With `gather_output=False` the output stays sharded (`[..., output_size / tp]`), ready for a
    `RowParallelLinear(input_is_parallel=True)`; with `True` every rank gets the full `Y`.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = True,
                 gather_output: bool = False, params_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.gather_output = gather_output
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_world_size()
        self.output_size_per_partition = divide(
            output_size, self.tp_size,
            f"output_size of {type(self).__name__} over the tensor parallel size")
        self._create_params(self.output_size_per_partition, input_size,
                            self.output_size_per_partition, bias, params_dtype)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        # Weight and bias both shard along dim 0 (the output features).
        _load_shard(param.data, loaded_weight, 0, self.tp_rank, self.tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.gather_output:
            y = tensor_model_parallel_all_gather(y, dim=-1)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.input_size}, output_features={self.output_size_per_partition}"
                f" (of {self.output_size}), bias={self.bias is not None}, tp_size={self.tp_size},"
                f" gather_output={self.gather_output}")


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input fused into one matmul.

    Each rank holds its slice of every part, `[out_0 / tp | out_1 / tp | ...]`, so the output
    stays sharded (a gathered output would interleave the parts, hence no `gather_output`).
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = True,
                 params_dtype: torch.dtype | None = None) -> None:
        self.output_sizes = list(output_sizes)
        tp_size = get_tp_world_size()
        for size in self.output_sizes:
            divide(size, tp_size, f"output size {size} of {type(self).__name__} "
                                  f"{self.output_sizes} over the tensor parallel size")
        super().__init__(input_size, sum(self.output_sizes), bias=bias, gather_output=False,
                         params_dtype=params_dtype)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      loaded_shard_id: int | None = None) -> None:
        """Load part `loaded_shard_id` (its full tensor), or all parts fused when None."""
        if loaded_shard_id is None:
            _check_fused_rows(loaded_weight, sum(self.output_sizes))
            for shard_id, part in enumerate(loaded_weight.split(self.output_sizes, dim=0)):
                self.weight_loader(param, part, shard_id)
            return
        if not 0 <= loaded_shard_id < len(self.output_sizes):
            raise ValueError(f"loaded_shard_id {loaded_shard_id} out of range for "
                             f"{len(self.output_sizes)} merged outputs {self.output_sizes}")
        offset = sum(self.output_sizes[:loaded_shard_id]) // self.tp_size
        size = self.output_sizes[loaded_shard_id] // self.tp_size
        _load_shard(param.data.narrow(0, offset, size), loaded_weight, 0, self.tp_rank,
                    self.tp_size)


class QKVParallelLinear(ColumnParallelLinear):
    """The fused query/key/value projection, sharded by attention heads.

    Each rank holds `[q | k | v]` for its heads. With fewer key/value heads than tp ranks
    (grouped-query attention) each key/value head is replicated on `tp / num_kv_heads` ranks.
    """

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int,
                 total_num_kv_heads: int | None = None, bias: bool = True,
                 params_dtype: torch.dtype | None = None) -> None:
        tp_size = get_tp_world_size()
        self.head_size = head_size
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads or total_num_heads
        self.num_heads = divide(total_num_heads, tp_size,
                                "total_num_heads of QKVParallelLinear over the tensor parallel size")
        if tp_size >= self.total_num_kv_heads:
            self.num_kv_heads = 1
            self.num_kv_head_replicas = divide(
                tp_size, self.total_num_kv_heads,
                "the tensor parallel size over total_num_kv_heads of QKVParallelLinear")
        else:
            self.num_kv_heads = divide(
                self.total_num_kv_heads, tp_size,
                "total_num_kv_heads of QKVParallelLinear over the tensor parallel size")
            self.num_kv_head_replicas = 1
        local_size = (self.num_heads + 2 * self.num_kv_heads) * head_size
        super().__init__(hidden_size, local_size * tp_size, bias=bias, gather_output=False,
                         params_dtype=params_dtype)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      loaded_shard_id: Literal["q", "k", "v"] | None = None) -> None:
        """Load the full q, k or v tensor (`loaded_shard_id`), or all three fused when None."""
        q_size = self.total_num_heads * self.head_size
        kv_size = self.total_num_kv_heads * self.head_size
        if loaded_shard_id is None:
            _check_fused_rows(loaded_weight, q_size + 2 * kv_size)
            parts = loaded_weight.split([q_size, kv_size, kv_size], dim=0)
            for shard_id, part in zip(("q", "k", "v"), parts):
                self.weight_loader(param, part, shard_id)
            return
        local_q = self.num_heads * self.head_size
        local_kv = self.num_kv_heads * self.head_size
        kv_index = self.tp_rank // self.num_kv_head_replicas
        kv_shards = self.total_num_kv_heads // self.num_kv_heads
        # shard id -> (offset in the local param, local size, block index, number of blocks)
        layout = {"q": (0, local_q, self.tp_rank, self.tp_size),
                  "k": (local_q, local_kv, kv_index, kv_shards),
                  "v": (local_q + local_kv, local_kv, kv_index, kv_shards)}
        if loaded_shard_id not in layout:
            raise ValueError(f"loaded_shard_id must be 'q', 'k' or 'v', got {loaded_shard_id!r}")
        offset, size, index, num_shards = layout[loaded_shard_id]
        _load_shard(param.data.narrow(0, offset, size), loaded_weight, 0, index, num_shards)


def _check_fused_rows(loaded_weight: torch.Tensor, expected_rows: int) -> None:
    if loaded_weight.shape[0] != expected_rows:
        raise ValueError(f"shape mismatch: fused checkpoint {tuple(loaded_weight.shape)} should "
                         f"have {expected_rows} rows (all merged outputs)")


class RowParallelLinear(LinearBase):
    """`Y = X A^T` with `A` split by input features: each rank computes a partial sum of `Y`.

    `input_is_parallel=True` takes the rank's slice of `X` (what a `ColumnParallelLinear`
    without gather gives); `False` takes the full `X` and slices it here. `reduce_results`
    sums the partial results over the tp group; the bias is added once, after that sum.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = True,
                 input_is_parallel: bool = True, reduce_results: bool = True,
                 params_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if bias and not reduce_results:
            # Every rank would add the bias to its partial sum, counting it tp times.
            raise ValueError("RowParallelLinear with reduce_results=False cannot have a bias; "
                             "pass bias=False and add it after your own reduction")
        self.input_size = input_size
        self.output_size = output_size
        self.input_is_parallel = input_is_parallel
        self.reduce_results = reduce_results
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_world_size()
        self.input_size_per_partition = divide(
            input_size, self.tp_size,
            f"input_size of {type(self).__name__} over the tensor parallel size")
        self._create_params(output_size, self.input_size_per_partition, output_size, bias,
                            params_dtype)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        if param is self.bias:
            _load_shard(param.data, loaded_weight)  # the bias is replicated
        else:
            _load_shard(param.data, loaded_weight, 1, self.tp_rank, self.tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = x.narrow(-1, self.tp_rank * self.input_size_per_partition,
                         self.input_size_per_partition)
        y = F.linear(x, self.weight)
        if self.reduce_results:
            y = tensor_model_parallel_all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return (f"input_features={self.input_size_per_partition} (of {self.input_size}), "
                f"output_features={self.output_size}, bias={self.bias is not None}, "
                f"tp_size={self.tp_size}, reduce_results={self.reduce_results}")
