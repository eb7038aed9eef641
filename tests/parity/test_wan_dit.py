"""Our Wan DiT against diffusers' `WanTransformer3DModel`, loaded from the same checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from fastvideo.models.dits.wanvideo import WanTransformer3DModel

TINY_CONFIG: dict[str, Any] = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
    out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32)
# Wan2.1 I2V / FLF2V add CLIP image tokens; diffusers assumes exactly 512 text tokens then.
I2V_CONFIG = {**TINY_CONFIG, "image_dim": 24, "added_kv_proj_dim": 32}
FLF2V_CONFIG = {**I2V_CONFIG, "pos_embed_seq_len": 10}

# A latent grid that is not square and has several frames: (T, H, W) = (3, 6, 10).
LATENT_SHAPE = (2, 4, 3, 6, 10)
# Same ops in the same order in fp32: only summation order inside kernels may differ.
FP32_ATOL = 1e-5


def _save_diffusers_model(folder: Path, config: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    """A seeded diffusers model with every parameter perturbed (diffusers zero-inits some,
    e.g. `pos_embed`, which would hide a wrong use of them), saved to `folder`."""
    from diffusers import WanTransformer3DModel as DiffusersWan

    torch.manual_seed(seed)
    model = DiffusersWan(**config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    model.save_pretrained(folder)
    return model


def _load_ours(folder: Path) -> WanTransformer3DModel:
    config = json.loads((folder / "config.json").read_text())
    model = WanTransformer3DModel.from_config(config)
    weights = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    missing, unexpected = model.load_weights(weights.items())
    assert not missing, f"parameters missing from the checkpoint: {sorted(missing)}"
    assert not unexpected, f"checkpoint tensors without a parameter: {sorted(unexpected)}"
    return model.eval()


def _inputs(image_tokens: int | None = None, text_len: int = 7,
            num_images: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    batch = LATENT_SHAPE[0]
    inputs = {
        "hidden_states": torch.randn(LATENT_SHAPE, generator=generator),
        "encoder_hidden_states": torch.randn(batch, text_len, 32, generator=generator),
        # Two distinct timesteps, one fractional: each sample gets its own modulation.
        "timestep": torch.tensor([999.0, 37.5]),
    }
    if image_tokens is not None:
        inputs["encoder_hidden_states_image"] = torch.randn(
            num_images, image_tokens, 24, generator=generator)
    return inputs


@torch.no_grad()
def _diffusers_forward(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs, return_dict=False)[0]


@pytest.fixture(scope="module")
def t2v(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    folder = tmp_path_factory.mktemp("wan-dit-t2v")
    return _save_diffusers_model(folder, TINY_CONFIG), folder


def test_loads_diffusers_checkpoint_unchanged(t2v: tuple[torch.nn.Module, Path]) -> None:
    reference, folder = t2v
    ours = _load_ours(folder)
    assert ours.config.patch_size == (1, 2, 2)
    assert ours.config.out_channels == 4
    # Every checkpoint tensor landed in our model unchanged (names differ only by mapping).
    ours_params = dict(ours.named_parameters())
    for name, tensor in reference.state_dict().items():
        assert torch.equal(ours_params[ours._map_name(name)], tensor), name


@pytest.mark.parametrize("timestep", [torch.tensor([999.0, 37.5]), torch.tensor([999, 37])],
                         ids=["float", "long"])
def test_fp32_forward_matches_diffusers(t2v: tuple[torch.nn.Module, Path],
                                        timestep: torch.Tensor) -> None:
    reference, folder = t2v
    ours = _load_ours(folder)
    inputs = {**_inputs(), "timestep": timestep}
    expected = _diffusers_forward(reference, inputs)
    with torch.no_grad():
        actual = ours(**inputs)
    assert actual.shape == expected.shape == LATENT_SHAPE
    torch.testing.assert_close(actual, expected, atol=FP32_ATOL, rtol=0)


def test_every_parameter_reaches_the_output(t2v: tuple[torch.nn.Module, Path]) -> None:
    # So the parity test above would catch any weight loaded into the wrong place.
    ours = _load_ours(t2v[1]).requires_grad_(True)
    ours(**_inputs()).square().sum().backward()
    unused = [name for name, p in ours.named_parameters()
              if p.grad is None or not p.grad.abs().sum() > 0]
    assert not unused


@pytest.mark.parametrize("config", [I2V_CONFIG, FLF2V_CONFIG], ids=["i2v", "flf2v"])
def test_fp32_image_conditioned_forward_matches_diffusers(tmp_path: Path,
                                                          config: dict[str, Any]) -> None:
    reference = _save_diffusers_model(tmp_path, config)
    ours = _load_ours(tmp_path)
    # FLF2V stacks first- and last-frame tokens as 2 image rows per sample.
    num_images = 2 * LATENT_SHAPE[0] if config.get("pos_embed_seq_len") else LATENT_SHAPE[0]
    inputs = _inputs(image_tokens=5, text_len=512, num_images=num_images)
    expected = _diffusers_forward(reference, inputs)
    with torch.no_grad():
        actual = ours(**inputs)
    torch.testing.assert_close(actual, expected, atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("config", [TINY_CONFIG, I2V_CONFIG], ids=["t2v", "i2v"])
def test_prepared_context_gives_the_same_prediction_bit_for_bit(
        tmp_path: Path, config: dict[str, Any]) -> None:
    """`prepare_context` computes every block's cross-attention keys and values once (a
    denoising loop's text is the same at every step); forwards that take them predict
    exactly what forwards computing them do."""
    _save_diffusers_model(tmp_path, config)
    ours = _load_ours(tmp_path)
    inputs = _inputs(image_tokens=5 if "image_dim" in config else None)
    context = {k: inputs.pop(k) for k in ("encoder_hidden_states",
                                          "encoder_hidden_states_image") if k in inputs}
    del inputs["timestep"]
    with torch.no_grad():
        prepared = ours.prepare_context(**context)
        kv = prepared["context_kv"]
        assert len(kv) == config["num_layers"] and {len(block) for block in kv} == \
            {4 if "image_dim" in config else 2}
        for timestep in (torch.tensor([999.0, 37.5]), torch.tensor([500.0, 1.0])):
            assert torch.equal(ours(**inputs, **prepared, timestep=timestep),
                               ours(**{**inputs, **context}, timestep=timestep))


def test_bf16_matches_diffusers_bf16(t2v: tuple[torch.nn.Module, Path]) -> None:
    from diffusers import WanTransformer3DModel as DiffusersWan

    _, folder = t2v
    reference = DiffusersWan.from_pretrained(folder, torch_dtype=torch.bfloat16).eval()
    ours = _load_ours(folder).to_compute_dtype(torch.bfloat16)
    # The same parameters stay fp32 as in diffusers' from_pretrained(torch_dtype=bf16).
    assert ({n: p.dtype for n, p in ours.named_parameters()}
            == {ours._map_name(n): p.dtype for n, p in reference.named_parameters()})

    inputs = _inputs()
    inputs_bf16 = {k: v.bfloat16() if k != "timestep" else v for k, v in inputs.items()}
    expected = _diffusers_forward(reference, inputs_bf16)
    with torch.no_grad():
        actual = ours(**inputs_bf16)
    assert actual.dtype == torch.bfloat16
    # Same op order and fp32 islands as diffusers, so the two agree to ~1 bf16 ulp of the
    # output (|out| < 4 -> ulp <= 2**-6); allow 2 ulps.
    torch.testing.assert_close(actual.float(), expected.float(), atol=2 * 2**-6, rtol=0)
    # And bf16 stays near the fp32 result: 5e-2 is ~3 ulps at |out| < 4 over 2 blocks.
    fp32 = _diffusers_forward(DiffusersWan.from_pretrained(folder).eval(), inputs)
    torch.testing.assert_close(actual.float(), fp32, atol=5e-2, rtol=0)


def test_load_weights_reports_missing_unexpected_and_bad_shapes(
        t2v: tuple[torch.nn.Module, Path]) -> None:
    weights = load_file(str(t2v[1] / "diffusion_pytorch_model.safetensors"))
    model = WanTransformer3DModel.from_config(TINY_CONFIG)
    dropped = "blocks.0.ffn.net.2.weight"
    extra = {"blocks.0.attn2.norm_added_q.weight": torch.ones(32),  # ignored, as diffusers does
             "not_a_param.weight": torch.ones(1)}
    missing, unexpected = model.load_weights(
        [(k, v) for k, v in weights.items() if k != dropped] + list(extra.items()))
    assert missing == {"blocks.0.ffn.fc_out.weight"}
    assert unexpected == {"not_a_param.weight"}

    bad = {**weights, "proj_out.weight": torch.ones(3, 3)}
    with pytest.raises(ValueError, match=r"proj_out\.weight.*shape mismatch"):
        model.load_weights(bad.items())
    bad = {**weights, "scale_shift_table": torch.ones(1, 2, 3)}
    with pytest.raises(ValueError, match=r"scale_shift_table.*shape mismatch"):
        model.load_weights(bad.items())


def test_config_checks() -> None:
    # Diffusers metadata keys are ignored, anything else unknown is an error.
    WanTransformer3DModel.from_config({**TINY_CONFIG, "_class_name": "WanTransformer3DModel",
                                       "_diffusers_version": "0.42.1"})
    with pytest.raises(ValueError, match="unknown .* config keys.*'windows'"):
        WanTransformer3DModel.from_config({**TINY_CONFIG, "windows": 3})
    with pytest.raises(ValueError, match="image_dim and added_kv_proj_dim"):
        WanTransformer3DModel.from_config({**TINY_CONFIG, "image_dim": 24})
    with pytest.warns(UserWarning, match="qk_norm"):
        WanTransformer3DModel.from_config({**TINY_CONFIG, "qk_norm": "rms_norm"})


def test_forward_rejects_bad_inputs() -> None:
    model = WanTransformer3DModel.from_config(TINY_CONFIG)
    inputs = _inputs()
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        model(**{**inputs, "hidden_states": torch.randn(2, 4, 3, 6, 9)})
    with pytest.raises(ValueError, match="timestep must be"):
        model(**{**inputs, "timestep": torch.ones(2, 3)})
    with pytest.raises(ValueError, match="encoder_hidden_states_image"):
        model(**inputs, encoder_hidden_states_image=torch.randn(2, 5, 24))
    with pytest.raises(ValueError, match="rope_max_seq_len"):
        model(**{**inputs, "hidden_states": torch.randn(2, 4, 33, 2, 2)})
    # The prepared keys and values replace the text, and the image: not both, not neither.
    prepared = model.prepare_context(inputs["encoder_hidden_states"])
    with pytest.raises(ValueError, match="exactly one of encoder_hidden_states and context_kv"):
        model(**inputs, context_kv=prepared["context_kv"])
    with pytest.raises(ValueError, match="exactly one of encoder_hidden_states and context_kv"):
        model(**{**inputs, "encoder_hidden_states": None})
    with pytest.raises(ValueError, match="encoder_hidden_states_image is in context_kv"):
        model(**{**inputs, **prepared}, encoder_hidden_states_image=torch.randn(2, 5, 24))
    with pytest.raises(ValueError, match="encoder_hidden_states_image must be given"):
        model.prepare_context(inputs["encoder_hidden_states"], torch.randn(2, 5, 24))
