"""Text encoders at tensor parallel size 2 (two gloo processes) against one process.

Each rank loads the full transformers checkpoint and keeps its half of the heads and
feed-forward width; the outputs must equal the single-process model's, and each rank must
hold the per-rank parameter count `benchmarks/encoder_memory.py` reports (about half).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from rank_launcher import assert_max_abs_diff, run_on_ranks
from torch import nn

from benchmarks.encoder_memory import per_rank_numel
from fastvideo.distributed import get_tp_world_size
from fastvideo.models.loader.component_loader import _load_fastvideo_model
from fastvideo.models.registry import resolve_model

# fp32; the same math per head, only the summation order of the row-parallel all-reduce and
# of the vocabulary-parallel lookup differs, a few ulp on O(1) values.
TOL = 1e-5
TP_SIZE = 2


def _tiny_references() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    t5 = dict(vocab_size=63, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=8)
    llama = dict(vocab_size=63, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                 num_attention_heads=4, max_position_embeddings=32)
    return {
        "T5EncoderModel": transformers.T5EncoderModel(transformers.T5Config(**t5)),
        "UMT5EncoderModel": transformers.UMT5EncoderModel(transformers.UMT5Config(**t5)),
        "CLIPTextModel": transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=16, eos_token_id=63)),
        # Grouped-query attention with the key/value heads split over the ranks, and with a
        # single key/value head replicated on both.
        "LlamaModel": transformers.LlamaModel(transformers.LlamaConfig(
            **llama, num_key_value_heads=2)),
        "LlamaModel-1kv": transformers.LlamaModel(transformers.LlamaConfig(
            **llama, num_key_value_heads=1)),
    }


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 63, (2, 9), generator=generator)  # 63: end-of-text of CLIP
    input_ids[0, -1] = input_ids[1, 4] = 63
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 5:] = 0
    return input_ids, mask


def _load(name: str, folder: Path) -> nn.Module:
    return _load_fastvideo_model(resolve_model(name.split("-")[0]), folder, "cpu", torch.float32)


def _outputs(model: nn.Module) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(*_inputs(), output_hidden_states=True)
    tensors = {"last_hidden_state": out.last_hidden_state}
    tensors.update({f"hidden_states[{i}]": h for i, h in enumerate(out.hidden_states)})
    if out.pooler_output is not None:
        tensors["pooler_output"] = out.pooler_output
    return tensors


def _check_tp_equals_one_process(cases: list[tuple[str, str, dict[str, torch.Tensor], int]],
                                 odd_heads_folder: str) -> None:
    assert get_tp_world_size() == TP_SIZE
    for name, folder, expected, expected_numel in cases:
        model = _load(name, Path(folder))
        numel = sum(p.numel() for p in model.parameters())
        assert numel == expected_numel, f"{name}: {numel} parameters on this rank, " \
                                        f"expected {expected_numel}"
        actual = _outputs(model)
        assert actual.keys() == expected.keys(), name
        for key, tensor in expected.items():
            try:
                assert_max_abs_diff(actual[key], tensor, TOL)
            except AssertionError as e:
                raise AssertionError(f"{name} {key}: {e}") from None
    # Heads that do not split over the ranks fail with the setting named.
    with pytest.raises(ValueError, match="total_num_heads of QKVParallelLinear .* 3 is not "
                                         "divisible by 2"):
        _load("LlamaModel", Path(odd_heads_folder))


def test_encoders_at_tp2_equal_one_process(tmp_path: Path) -> None:
    cases: list[Any] = []
    for name, reference in _tiny_references().items():
        folder = tmp_path / name
        reference.save_pretrained(folder)
        single = _load(name, folder)  # no process group here: tp = 1
        total = sum(p.numel() for p in single.parameters())
        per_rank = per_rank_numel(single, TP_SIZE)
        # About half: only norms, CLIP's position table and row-parallel biases replicate
        # (and Llama-1kv's single key/value head, on both ranks).
        assert per_rank < 0.6 * total, (name, per_rank, total)
        cases.append((name, str(folder), _outputs(single), per_rank))
    odd_heads = tmp_path / "odd-heads"
    transformers.LlamaModel(transformers.LlamaConfig(
        vocab_size=64, hidden_size=24, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=3, num_key_value_heads=1)).save_pretrained(odd_heads)
    run_on_ranks(_check_tp_equals_one_process, cases, str(odd_heads), world_size=TP_SIZE,
                 tp_size=TP_SIZE)
