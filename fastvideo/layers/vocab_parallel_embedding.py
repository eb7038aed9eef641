"""An embedding table sharded along the vocabulary over the tensor parallel group."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastvideo.distributed import get_tp_rank, get_tp_world_size, tensor_model_parallel_all_reduce


def pad_vocab_size(vocab_size: int, multiple: int) -> int:
    """Round `vocab_size` up to a multiple of `multiple`."""
    return -(-vocab_size // multiple) * multiple


class VocabParallelEmbedding(nn.Module):
    """`nn.Embedding` whose rows are split over the tp ranks.

    Rank r holds the contiguous rows `[r * n, (r + 1) * n)` of the vocabulary padded to a
    multiple of the tp size (padding rows are zero). Each rank looks up the ids it owns,
    writes zeros for the others, and an all-reduce sums the pieces into the full result.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 params_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_world_size()
        self.num_embeddings_padded = pad_vocab_size(num_embeddings, self.tp_size)
        self.num_embeddings_per_partition = self.num_embeddings_padded // self.tp_size
        self.vocab_start_index = self.tp_rank * self.num_embeddings_per_partition
        self.vocab_end_index = self.vocab_start_index + self.num_embeddings_per_partition
        self.weight = nn.Parameter(
            torch.empty(self.num_embeddings_per_partition, embedding_dim, dtype=params_dtype))
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        """Copy this rank's rows of the full `[num_embeddings, embedding_dim]` table."""
        expected = (self.num_embeddings, self.embedding_dim)
        if tuple(loaded_weight.shape) != expected:
            raise ValueError(f"shape mismatch: checkpoint {tuple(loaded_weight.shape)}, "
                             f"expected the full table {expected}")
        # The last rank's block may reach into the padding, which has no checkpoint rows.
        num_rows = max(0, min(self.vocab_end_index, self.num_embeddings) - self.vocab_start_index)
        param.data[:num_rows].copy_(loaded_weight[self.vocab_start_index:][:num_rows])
        param.data[num_rows:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        not_mine = (input_ids < self.vocab_start_index) | (input_ids >= self.vocab_end_index)
        local_ids = (input_ids - self.vocab_start_index).masked_fill(not_mine, 0)
        out = F.embedding(local_ids, self.weight).masked_fill(not_mine.unsqueeze(-1), 0)
        return tensor_model_parallel_all_reduce(out)

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.num_embeddings_per_partition} (of {self.num_embeddings}, "
                f"padded to {self.num_embeddings_padded}), embedding_dim={self.embedding_dim}, "
                f"tp_size={self.tp_size}")
