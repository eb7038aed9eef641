"""VocabParallelEmbedding equals nn.Embedding on the same full table."""

from __future__ import annotations

import pytest
import torch
from rank_launcher import run_on_ranks
from torch import nn

from fastvideo.layers.vocab_parallel_embedding import VocabParallelEmbedding


@torch.no_grad()
def _check_embedding(num_embeddings: int) -> None:
    torch.manual_seed(0)
    reference = nn.Embedding(num_embeddings, 6)
    layer = VocabParallelEmbedding(num_embeddings, 6)
    layer.weight.weight_loader(layer.weight, reference.weight.detach())
    ids = torch.randint(0, num_embeddings, (3, 7))
    ids[0, :2] = torch.tensor([0, num_embeddings - 1])  # both ends of the vocabulary
    # Exactly one rank contributes each row and the others add zeros: no rounding at all.
    assert torch.equal(layer(ids), reference(ids))


@pytest.mark.parametrize("num_embeddings", [12, 11])  # 11: the last shard is padded
def test_on_two_ranks_equals_nn_embedding(num_embeddings: int) -> None:
    run_on_ranks(_check_embedding, num_embeddings, tp_size=2)


def test_without_set_up_equals_nn_embedding(uninitialised: None) -> None:
    _check_embedding(11)


def test_weight_loader_wants_the_full_table(uninitialised: None) -> None:
    layer = VocabParallelEmbedding(11, 6)
    with pytest.raises(ValueError, match=r"checkpoint \(10, 6\), expected the full table \(11, 6\)"):
        layer.weight.weight_loader(layer.weight, torch.zeros(10, 6))
