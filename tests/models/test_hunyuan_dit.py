"""Our HunyuanVideo DiT against diffusers' `HunyuanVideoTransformer3DModel`, loaded from the
same checkpoint through the engine's loader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastvideo.attention.layer import attention_backends_in_use, request_attention_backend
from fastvideo.attention.metadata import AttentionMetadata
from fastvideo.attention.sta_config import STAConfig
from fastvideo.models.dits.hunyuanvideo import HunyuanVideoTransformer3DModel
from fastvideo.models.loader.component_loader import _load_fastvideo_model
from fastvideo.models.registry import resolve_model

# The real model's patch sizes and guidance embedding; 2 dual + 2 single blocks.
TINY_CONFIG: dict[str, Any] = dict(
    in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
    num_single_layers=2, num_refiner_layers=2, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
    qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=24,
    rope_theta=256.0, rope_axes_dim=(4, 6, 6))
# (T, H, W) = (3, 6, 10) latents: a (3, 3, 5) token grid.
LATENT_SHAPE = (2, 4, 3, 6, 10)
TEXT_LEN = 7
# fp32, the same ops: only summation order inside kernels (and RoPE angles, fp64 here and
# fp32 in diffusers, ~1e-7) may differ.
FP32_ATOL = 1e-5
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """A seeded diffusers model with every parameter perturbed (diffusers zero-inits none
    here, but a perturbation also breaks symmetries such as equal q/k norms), saved."""
    from diffusers import HunyuanVideoTransformer3DModel as DiffusersHunyuan

    folder = tmp_path_factory.mktemp("hunyuan-dit")
    torch.manual_seed(0)
    model = DiffusersHunyuan(**TINY_CONFIG).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(folder)
    return model, folder


def load_ours(folder: Path) -> HunyuanVideoTransformer3DModel:
    entry = resolve_model("HunyuanVideoTransformer3DModel", "diffusers")
    return _load_fastvideo_model(entry, folder, "cpu", torch.float32)


def make_inputs(lengths: list[int], seed: int = 1) -> dict[str, torch.Tensor]:
    """Inputs for `len(lengths)` prompts, prompt i with `lengths[i]` real tokens of
    `TEXT_LEN`; its padding holds large values, so any leak shows."""
    generator = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    mask = torch.arange(TEXT_LEN)[None] < torch.tensor(lengths)[:, None]
    text = torch.randn(batch, TEXT_LEN, TINY_CONFIG["text_embed_dim"], generator=generator)
    return {
        "hidden_states": torch.randn(batch, *LATENT_SHAPE[1:], generator=generator),
        "timestep": torch.tensor([999.0, 37.5][:batch]),
        "encoder_hidden_states": torch.where(mask[..., None], text, 100.0),
        "encoder_attention_mask": mask.long(),
        "pooled_projections": torch.randn(batch, TINY_CONFIG["pooled_projection_dim"],
                                          generator=generator),
        "guidance": torch.tensor([6000.0, 3500.0][:batch]),  # scale x 1000, as diffusers
    }


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    diff = (actual - expected).abs().max().item()
    assert diff <= FP32_ATOL, f"max abs diff {diff:.3e} > {FP32_ATOL:.0e}"


@pytest.mark.parametrize("lengths", [
    [4, 6],  # different lengths: each item attends its own prompt
    [5],  # one prompt: the text is cut to its length
    [7, 7],  # no padding
])
@torch.no_grad()
def test_matches_diffusers(checkpoint: tuple[torch.nn.Module, Path], lengths: list[int]) -> None:
    reference, folder = checkpoint
    inputs = make_inputs(lengths)
    expected = reference(**inputs, return_dict=False)[0]
    assert_close(load_ours(folder)(**inputs), expected)


@torch.no_grad()
def test_padding_never_leaks(checkpoint: tuple[torch.nn.Module, Path]) -> None:
    """Changing a prompt's padding (values and amount) changes nothing."""
    model = load_ours(checkpoint[1])
    inputs = make_inputs([4, 6])
    expected = model(**inputs)
    text = inputs["encoder_hidden_states"].clone()
    text[0, 4:] = -3.0
    text[1, 6:] = 7.0
    assert torch.equal(model(**{**inputs, "encoder_hidden_states": text}), expected)
    # The first prompt alone, with its padding dropped: the same output for it.
    alone = {k: v[:1] for k, v in inputs.items()}
    alone["encoder_hidden_states"] = alone["encoder_hidden_states"][:, :4]
    alone["encoder_attention_mask"] = alone["encoder_attention_mask"][:, :4]
    assert_close(model(**alone), expected[:1])


@torch.no_grad()
def test_sliding_tile_with_whole_grid_window_is_dense(
        checkpoint: tuple[torch.nn.Module, Path]) -> None:
    """STA on the video tokens (text appended) with windows covering the whole tile grid
    attends everything: the dense result, with prompts of different lengths."""
    model = load_ours(checkpoint[1])
    inputs = make_inputs([4, 6])
    expected = model(**inputs)
    assert request_attention_backend(model, "sliding_tile_attn") == (
        TINY_CONFIG["num_layers"] + TINY_CONFIG["num_single_layers"])
    config = STAConfig(tile_size=(1, 2, 2), default_window=(3, 2, 3))  # 3 x 2 x 3 tiles
    assert_close(model(**inputs, attn_metadata=AttentionMetadata(sta_config=config)), expected)
    # STA in the blocks; SDPA in the token refiner (text only).
    assert attention_backends_in_use(model)["chosen"] == ["SLIDING_TILE_ATTN", "TORCH_SDPA"]


def test_missing_and_unexpected_weights_are_named(checkpoint: tuple[torch.nn.Module, Path],
                                                  tmp_path: Path) -> None:
    folder = checkpoint[1]
    weights = load_file(str(folder / WEIGHTS))
    missing_name = "single_transformer_blocks.1.attn.norm_k.weight"
    weights.pop(missing_name)
    weights["transformer_blocks.0.attn.surprise.weight"] = torch.zeros(1)
    model = HunyuanVideoTransformer3DModel.from_config(TINY_CONFIG)
    missing, unexpected = model.load_weights(weights.items())
    assert missing == {"single_transformer_blocks.1.norm_k.weight"}
    assert unexpected == {"transformer_blocks.0.attn.surprise.weight"}

    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(weights, str(tmp_path / WEIGHTS))
    with pytest.raises(ValueError, match=r"single_transformer_blocks\.1\.norm_k\.weight"):
        load_ours(tmp_path)


@pytest.mark.parametrize(("change", "message"), [
    ({"guidance": None}, "guidance must be given"),
    ({"encoder_attention_mask": torch.tensor([[0, 1, 1, 1, 1, 1, 1]] * 2)}, "prefix"),
    ({"timestep": torch.tensor([[1.0], [2.0]])}, r"timestep must be \[B\]"),
])
def test_bad_inputs_are_named(checkpoint: tuple[torch.nn.Module, Path], change: dict[str, Any],
                              message: str) -> None:
    model = load_ours(checkpoint[1])
    with pytest.raises(ValueError, match=message):
        model(**{**make_inputs([4, 6]), **change})


def test_compile_hook_finds_both_block_kinds() -> None:
    from fastvideo.models.compile import repeated_blocks

    model = HunyuanVideoTransformer3DModel(**TINY_CONFIG)
    assert repeated_blocks(model) == [*model.transformer_blocks, *model.single_transformer_blocks]


def test_compiled_blocks_are_one_graph_per_block_kind(checkpoint) -> None:
    """Two graphs (dual- and single-stream), equal to eager: a block fed a view of another
    block's output would compile a second graph of its kind (its strides differ). Prompts of
    other lengths make the text length symbolic once, not a graph per length."""
    import torch._dynamo

    from fastvideo.models.compile import compile_repeated_blocks

    model = load_ours(checkpoint[1])
    inputs = {length: make_inputs([length], seed=length) for length in (5, 6, 7, 3)}
    with torch.no_grad():
        eager = {length: model(**given) for length, given in inputs.items()}
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compile_repeated_blocks(model, dtype=torch.float32)
        for i, (length, given) in enumerate(inputs.items()):
            compiled = model(**given)
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            assert graphs == (2 if i == 0 else 4), f"text length {length}: {graphs} graphs"
            torch.testing.assert_close(compiled, eager[length], rtol=0, atol=1e-4)
