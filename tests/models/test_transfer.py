"""A module's move to the GPU on several host threads (`fastvideo.models.loader.transfer`):
what `module.to` gives (values, the same Parameter objects, ties, buffers), and a clear
error for a bad thread count. The copies run on CPU here; on CUDA they are `.to(device)`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastvideo.models.loader.transfer import (
    copy_tensors,
    load_threads,
    staged,
    to_device,
    weights_to_device,
)


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Embedding(10, 4)
        self.encoder = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.embed_tokens = self.shared  # tied, as transformers ties T5's embeddings
        self.register_buffer("positions", torch.arange(6.0))


def test_copies_replace_the_data_and_keep_parameters_and_ties() -> None:
    torch.manual_seed(0)
    model = _Tied()
    params = {name: p for name, p in model.named_parameters()}
    before = {name: t.clone() for name, t in model.state_dict().items()}
    copied: list[int] = []

    def copy(t: torch.Tensor) -> torch.Tensor:
        copied.append(t.numel())
        return t.clone()

    assert copy_tensors(model, copy, threads=4) is model
    assert len(copied) == 6  # embedding once, linear 2, norm 2, the buffer
    assert {name: p for name, p in model.named_parameters()} == params  # same objects
    assert model.embed_tokens.weight is model.shared.weight
    after = model.state_dict()
    assert all(torch.equal(after[name], value) for name, value in before.items())
    assert all(after[name].data_ptr() != value.data_ptr() for name, value in before.items())


def test_off_cuda_or_one_thread_is_module_to(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _Tied()
    assert to_device(model, "cpu", threads=8) is model
    monkeypatch.setenv("FASTVIDEO_LOAD_THREADS", "3")
    assert load_threads() == 3
    monkeypatch.setenv("FASTVIDEO_LOAD_THREADS", "0")
    with pytest.raises(ValueError, match=r"FASTVIDEO_LOAD_THREADS='0'; allowed: an integer >= 1"):
        load_threads()
    monkeypatch.delenv("FASTVIDEO_LOAD_THREADS")
    assert load_threads() == 8


def test_staged_weights_come_in_order_copied_and_at_most_a_window_ahead() -> None:
    taken: list[int] = []
    weights = ((f"w{i}", torch.full((3,), float(i))) for i in range(20))

    def source():
        for name, tensor in weights:
            taken.append(int(name[1:]))
            yield name, tensor

    out = []
    for name, tensor in staged(source(), lambda t: t * 2, threads=3, ahead=4):
        assert len(taken) - len(out) <= 4  # never more than the window read ahead
        out.append((name, tensor))
    assert [name for name, _ in out] == [f"w{i}" for i in range(20)]
    assert all(torch.equal(t, torch.full((3,), 2.0 * i)) for i, (_, t) in enumerate(out))
    # Off CUDA the weights pass as they are.
    plain = iter([("a", torch.ones(1))])
    assert weights_to_device(plain, "cpu", threads=8) is plain
