"""Our text encoders equal transformers' on the same saved checkpoint (fp32, eval mode).

Each reference is a tiny model built with transformers' own classes and saved with
`save_pretrained`, so the checkpoint names are exactly what transformers writes; ours is
loaded through the component loader, as a pipeline loads it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

from fastvideo.models.loader.component_loader import _load_fastvideo_model
from fastvideo.models.registry import resolve_model

# fp32: the same math as transformers in another order (fused projections, SDPA with an
# additive mask) moves O(1) outputs by a few ulp; a wrong weight or mask moves them by O(1).
TOL = 1e-5


def _save_and_load(reference: nn.Module, folder: Path, **save_kwargs: object
                   ) -> tuple[nn.Module, nn.Module]:
    reference.save_pretrained(folder, **save_kwargs)
    class_name = type(reference).__name__
    ours = _load_fastvideo_model(resolve_model(class_name), folder, "cpu", torch.float32)
    return reference.eval(), ours


def _inputs(vocab_size: int, batch: int = 2, seq_len: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and a right-padded mask (the second prompt is 4 tokens shorter)."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, vocab_size, (batch, seq_len), generator=generator)
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    mask[1, -4:] = 0
    return input_ids, mask


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs().max().item()
    assert diff <= TOL, f"{what}: max abs diff {diff:.2e} > {TOL:.0e}"


@pytest.mark.parametrize("name", ["T5", "UMT5"])
@torch.no_grad()
def test_t5_encoders_match_transformers(name: str, tmp_path: Path) -> None:
    config_cls = getattr(transformers, f"{name}Config")
    model_cls = getattr(transformers, f"{name}EncoderModel")
    torch.manual_seed(0)
    config = config_cls(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
                        feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                        relative_attention_max_distance=16)
    reference, ours = _save_and_load(model_cls(config), tmp_path)
    input_ids, mask = _inputs(config.vocab_size, seq_len=20)  # past max_distance
    expected = reference(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
    actual = ours(input_ids, mask, output_hidden_states=True)
    _assert_close(actual.last_hidden_state, expected.last_hidden_state, "last_hidden_state")
    assert len(actual.hidden_states) == len(expected.hidden_states)
    for i, (a, e) in enumerate(zip(actual.hidden_states, expected.hidden_states)):
        _assert_close(a, e, f"hidden_states[{i}]")


@pytest.mark.parametrize("eos_token_id", [2, 60], ids=["legacy-eos-2", "eos-id"])
@torch.no_grad()
def test_clip_text_matches_transformers(eos_token_id: int, tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=16, eos_token_id=eos_token_id,
        bos_token_id=1, pad_token_id=0)
    reference, ours = _save_and_load(transformers.CLIPTextModel(config), tmp_path)
    input_ids, mask = _inputs(config.vocab_size)
    # End-of-text after each prompt: at 5 in the padded one, last in the full one; with the
    # legacy id 2 transformers pools at the highest id, so make that the end-of-text too.
    input_ids = input_ids.clamp(max=config.vocab_size - 2)
    eos = eos_token_id if eos_token_id != 2 else config.vocab_size - 1
    input_ids[0, -1] = input_ids[1, 4] = eos
    input_ids[1, 5:] = eos  # padded with the end-of-text id, as CLIP's tokenizer does
    expected = reference(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
    actual = ours(input_ids, mask, output_hidden_states=True)
    _assert_close(actual.last_hidden_state, expected.last_hidden_state, "last_hidden_state")
    _assert_close(actual.pooler_output, expected.pooler_output, "pooler_output")
    assert len(actual.hidden_states) == len(expected.hidden_states) == 3
    for i, (a, e) in enumerate(zip(actual.hidden_states, expected.hidden_states)):
        _assert_close(a, e, f"hidden_states[{i}]")


@torch.no_grad()
def test_llama_matches_transformers_from_a_sharded_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rope_theta=500000.0)
    reference, ours = _save_and_load(transformers.LlamaModel(config), tmp_path,
                                     max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    input_ids, mask = _inputs(config.vocab_size)
    expected = reference(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
    actual = ours(input_ids, attention_mask=mask, output_hidden_states=True)
    _assert_close(actual.last_hidden_state, expected.last_hidden_state, "last_hidden_state")
    # HunyuanVideo's prompt embedding is hidden_states[-3].
    assert len(actual.hidden_states) == len(expected.hidden_states) == 5
    for i, (a, e) in enumerate(zip(actual.hidden_states, expected.hidden_states)):
        _assert_close(a, e, f"hidden_states[{i}]")



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@torch.no_grad()
def test_half_precision_rounds_as_transformers(dtype: torch.dtype, tmp_path: Path) -> None:
    """Loaded in half precision as a pipeline loads them (`from_pretrained(dtype=...)` for
    transformers, `to_compute_dtype` for ours: in fp16 T5 keeps `wo` in fp32), the outputs are
    equal bit for bit on CPU: every op rounds where transformers' does (T5's op-by-op
    `gelu_new`, the norms' fp32 math), so no ulp drift builds up over the layers."""
    torch.manual_seed(0)
    references = {
        "umt5": transformers.UMT5EncoderModel(transformers.UMT5Config(
            vocab_size=64, d_model=64, d_kv=16, d_ff=96, num_layers=3, num_heads=4,
            feed_forward_proj="gated-gelu")),
        "llama": transformers.LlamaModel(transformers.LlamaConfig(
            vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2)),
        "clip": transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, eos_token_id=63)),
    }
    input_ids, mask = _inputs(63, seq_len=12)
    input_ids[:, -1] = 63
    for name, reference in references.items():
        folder = tmp_path / name
        reference.save_pretrained(folder)
        expected = type(reference).from_pretrained(folder, dtype=dtype).eval()(
            input_ids=input_ids, attention_mask=mask).last_hidden_state
        ours = _load_fastvideo_model(resolve_model(type(reference).__name__), folder, "cpu",
                                     dtype)
        actual = ours(input_ids, mask).last_hidden_state
        assert actual.dtype == expected.dtype == dtype
        diff = (actual.float() - expected.float()).abs().max().item()
        assert torch.equal(actual, expected), f"{name}: max abs diff {diff}"
        # Unpadded (HunyuanVideo calls CLIP without a mask): transformers then attends with
        # SDPA's causal flag instead of a mask, and so do we.
        for given in (None, torch.ones_like(mask)):
            expected = type(reference).from_pretrained(folder, dtype=dtype).eval()(
                input_ids=input_ids, attention_mask=given).last_hidden_state
            actual = ours(input_ids, given).last_hidden_state
            diff = (actual.float() - expected.float()).abs().max().item()
            assert torch.equal(actual, expected), f"{name}, no padding: max abs diff {diff}"


@torch.no_grad()
def test_warm_up_on_device_runs_each_encoder_and_changes_nothing(tmp_path: Path) -> None:
    """`warm_up_on_device` (the preload thread's first call on a GPU) works for every
    encoder, within its positions (CLIP: 77), and leaves the model as it was."""
    torch.manual_seed(0)
    models = {
        "umt5": transformers.UMT5EncoderModel(transformers.UMT5Config(
            vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)),
        "clip": transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77)),
        "llama": transformers.LlamaModel(transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)),
    }
    for name, reference in models.items():
        _, ours = _save_and_load(reference, tmp_path / name)
        input_ids, mask = _inputs(64)
        before = ours(input_ids, mask).last_hidden_state
        state = {k: v.clone() for k, v in ours.state_dict().items()}
        ours.warm_up_on_device()
        assert all(torch.equal(v, state[k]) for k, v in ours.state_dict().items()), name
        assert torch.equal(ours(input_ids, mask).last_hidden_state, before), name


def test_preload_warms_text_encoders_on_a_single_process_gpu_only(caplog) -> None:
    from types import SimpleNamespace

    from fastvideo.jobs.engine import _warm_up_on_device

    calls: list[str] = []

    class Encoder:
        def warm_up_on_device(self) -> None:
            calls.append("warm")

    class Broken:
        def warm_up_on_device(self) -> None:
            raise RuntimeError("no kernel image")

    _warm_up_on_device("text_encoder", Encoder(), SimpleNamespace(device="cpu"))
    _warm_up_on_device("transformer", object(), SimpleNamespace(device="cuda"))
    assert calls == []
    _warm_up_on_device("text_encoder", Encoder(), SimpleNamespace(device="cuda:1"))
    assert calls == ["warm"]
    _warm_up_on_device("text_encoder", Broken(), SimpleNamespace(device="cuda"))  # no raise
    assert "warming text_encoder up on cuda failed" in caplog.text
    assert "no kernel image" in caplog.text
