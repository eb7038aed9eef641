"""Attention backend selection (argument > env var > layer default, with fallbacks) and layers."""

from __future__ import annotations

import sys
import types
import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from fastvideo.attention import (
    ATTENTION_BACKEND_ENV,
    DistributedAttention,
    LocalAttention,
    _Backend,
    get_attn_backend,
)
from fastvideo.attention.backends import flash_cute

SDPA, FLASH, STA = _Backend.TORCH_SDPA, _Backend.FLASH_ATTN, _Backend.SLIDING_TILE_ATTN
CUDA = torch.device("cuda")  # only named: selection never touches the device


@pytest.fixture(autouse=True)
def _no_env_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ATTENTION_BACKEND_ENV, raising=False)


@pytest.fixture(autouse=True)
def _fresh_cute_probe() -> Iterator[None]:
    """The CuTe import probe is cached per process; tests fake the package both ways."""
    flash_cute._import_failure.cache_clear()
    yield
    flash_cute._import_failure.cache_clear()


@pytest.fixture
def flash_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `from flash_attn import flash_attn_func` (FlashAttention 2) succeed, so
    FLASH_ATTN is available for bf16 on CUDA; its CuTe kernels stay missing."""
    module = types.ModuleType("flash_attn")
    module.flash_attn_func = lambda *args, **kwargs: None
    monkeypatch.setitem(sys.modules, "flash_attn", module)


@pytest.fixture
def flash_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # makes the import raise ImportError


def _fake_cute(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int]) -> None:
    """Make FlashAttention's CuTe kernels importable (and FA2 missing) on a GPU of
    `capability`."""
    package = types.ModuleType("flash_attn")
    package.__path__ = []
    cute = types.ModuleType("flash_attn.cute")
    cute.__path__ = []
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    monkeypatch.setitem(sys.modules, "flash_attn.cute.interface",
                        types.ModuleType("flash_attn.cute.interface"))
    monkeypatch.setattr(flash_cute, "_capability", lambda device: capability)


def test_cute_kernels_are_preferred_where_they_run(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cute(monkeypatch, (9, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # taking a preferred backend is silent
        assert _select((SDPA, FLASH)) is FLASH
        assert _select((SDPA, FLASH, STA)) is FLASH
        assert _select((SDPA,)) is SDPA  # only among the layer's backends
        assert get_attn_backend(64, torch.bfloat16, CUDA, (SDPA, FLASH),
                                use_preferred=False).name is SDPA  # a layer may opt out
        assert _select((SDPA, FLASH), requested="TORCH_SDPA") is SDPA  # a choice wins
        monkeypatch.setenv(ATTENTION_BACKEND_ENV, "TORCH_SDPA")
        assert _select((SDPA, FLASH)) is SDPA
        monkeypatch.delenv(ATTENTION_BACKEND_ENV)
        # fp32, the CPU, or a GPU they are not built for: the layer's own order.
        assert get_attn_backend(64, torch.float32, CUDA, (SDPA, FLASH)).name is SDPA
        assert _select((SDPA, FLASH), device=torch.device("cpu")) is SDPA
        monkeypatch.setattr(flash_cute, "_capability", lambda device: (8, 0))
        assert _select((SDPA, FLASH)) is SDPA
    with pytest.warns(UserWarning, match=r"FLASH_ATTN cannot run here .*compute capability "
                                         r"\(9, 10, 11\)\.x, this GPU is 8\.0"):
        assert _select((SDPA, FLASH), requested="FLASH_ATTN") is SDPA


def _select(supported: tuple[_Backend, ...], requested: str | None = None,
            device: torch.device = CUDA) -> _Backend:
    return get_attn_backend(64, torch.bfloat16, device, supported, requested).name


@pytest.mark.usefixtures("flash_installed")
def test_precedence_argument_then_env_then_layer_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _select((SDPA, FLASH)) is SDPA
    assert _select((FLASH, SDPA)) is FLASH
    monkeypatch.setenv(ATTENTION_BACKEND_ENV, "FLASH_ATTN")
    assert _select((SDPA, FLASH)) is FLASH
    assert _select((SDPA, FLASH), requested="TORCH_SDPA") is SDPA
    monkeypatch.setenv(ATTENTION_BACKEND_ENV, "torch_sdpa")  # names are case-insensitive
    assert _select((FLASH, SDPA)) is SDPA
    assert _select((FLASH, SDPA), requested="flash_attn") is FLASH


@pytest.mark.usefixtures("flash_missing")
def test_flash_without_package_falls_back_with_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.warns(UserWarning, match=r"FLASH_ATTN cannot run here \(package 'flash_attn'"):
        assert _select((SDPA, FLASH), requested="FLASH_ATTN") is SDPA
    monkeypatch.setenv(ATTENTION_BACKEND_ENV, "FLASH_ATTN")
    with pytest.warns(UserWarning, match="flash_attn"):
        assert _select((SDPA, FLASH)) is SDPA
    with pytest.warns(UserWarning, match="flash_attn"):  # also when it is the layer default
        assert _select((FLASH, SDPA), requested=None) is SDPA


@pytest.mark.usefixtures("flash_installed")
def test_flash_falls_back_off_cuda_and_for_fp32() -> None:
    with pytest.warns(UserWarning, match="device 'cpu'"):
        assert _select((FLASH, SDPA), device=torch.device("cpu")) is SDPA
    with pytest.warns(UserWarning, match="dtype torch.float32"):
        assert get_attn_backend(64, torch.float32, CUDA, (FLASH, SDPA)).name is SDPA


def test_sliding_tile_is_selectable_and_falls_back_off_its_devices() -> None:
    assert _select((SDPA, STA), requested="SLIDING_TILE_ATTN") is STA
    with pytest.warns(UserWarning, match=r"SLIDING_TILE_ATTN cannot run here \(device 'mps'"):
        assert _select((SDPA, STA), requested="SLIDING_TILE_ATTN",
                       device=torch.device("mps")) is SDPA


def test_backend_the_layer_does_not_support_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ATTENTION_BACKEND_ENV, "SLIDING_TILE_ATTN")
    with pytest.warns(UserWarning, match=rf"SLIDING_TILE_ATTN \({ATTENTION_BACKEND_ENV}\) is not "
                                         r"supported by this layer"):
        assert _select((SDPA, FLASH)) is SDPA


def test_unknown_names_raise_listing_valid_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"unknown attention backend 'XFORMERS'.*TORCH_SDPA.*"
                                         r"FLASH_ATTN.*SLIDING_TILE_ATTN"):
        _select((SDPA,), requested="XFORMERS")
    monkeypatch.setenv(ATTENTION_BACKEND_ENV, "sdpa")
    with pytest.raises(ValueError, match="unknown attention backend 'sdpa'"):
        _select((SDPA,))


@pytest.mark.usefixtures("flash_missing")
def test_no_runnable_backend_raises() -> None:
    with pytest.raises(ValueError, match="no attention backend can run.*FLASH_ATTN: package"):
        _select((FLASH,))
    with pytest.raises(ValueError, match="empty"):
        _select(())


def _qkv(seq_len: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, seq_len, 3, 8, generator=generator) for _ in range(3))


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         **kwargs)
    return out.transpose(1, 2)


@pytest.mark.parametrize("layer_cls", [LocalAttention, DistributedAttention])
def test_layers_compute_attention_on_bshd(layer_cls: type[torch.nn.Module]) -> None:
    q, k, v = _qkv()
    out = layer_cls(3, 8)(q, k, v)
    assert out.shape == q.shape
    torch.testing.assert_close(out, _reference(q, k, v), atol=1e-6, rtol=0)
    scaled_causal = layer_cls(3, 8, softmax_scale=0.5, causal=True)(q, k, v)
    torch.testing.assert_close(scaled_causal, _reference(q, k, v, scale=0.5, is_causal=True),
                               atol=1e-6, rtol=0)


def test_layer_applies_env_choice_with_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ATTENTION_BACKEND_ENV, "FLASH_ATTN")
    layer = LocalAttention(3, 8, supported_attention_backends=(SDPA, FLASH))
    q, k, v = _qkv()
    with pytest.warns(UserWarning, match="FLASH_ATTN cannot run here"):  # fp32 on CPU
        out = layer(q, k, v)
    torch.testing.assert_close(out, _reference(q, k, v), atol=1e-6, rtol=0)




def test_requesting_a_backend_chooses_again_for_inputs_seen() -> None:
    from torch import nn

    from fastvideo.attention.layer import request_attention_backend, select_attention_backends

    model = nn.ModuleDict({"a": LocalAttention(3, 8, supported_attention_backends=(SDPA, STA)),
                           "b": LocalAttention(3, 8)})
    model.register_parameter("w", nn.Parameter(torch.zeros(1)))
    assert select_attention_backends(model, torch.float32) == 2
    key = (torch.float32, torch.device("cpu"))
    assert model["a"]._backends[key].name is SDPA
    assert request_attention_backend(model, "SLIDING_TILE_ATTN") == 1
    assert model["a"]._backends[key].name is STA  # chosen again at once, not at first call
    assert model["b"]._backends[key].name is SDPA


@pytest.mark.parametrize(("capability", "head_size", "causal", "expected"), [
    ((9, 0), 128, False, flash_cute.SM90_DENSE_HEAD128_CONFIG),  # Hopper, Wan's heads
    ((9, 0), 64, False, {}), ((9, 0), 128, True, {}), ((10, 0), 128, False, {}),
])
def test_dense_cute_kernel_options(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int],
                                   head_size: int, causal: bool, expected: dict) -> None:
    """The dense op passes its tile choice to the package only where it was measured faster."""
    _fake_cute(monkeypatch, capability)
    calls = []

    def fake_forward(q, k, v, **kwargs):
        calls.append(kwargs)
        return (torch.zeros_like(q),)

    sys.modules["flash_attn.cute.interface"]._flash_attn_fwd = fake_forward
    q = torch.randn(1, 8, 2, head_size, dtype=torch.bfloat16)
    flash_cute.flash_cute_attention(q, q, q, 0.1, causal)
    options = {k: v for k, v in calls[0].items() if k not in ("softmax_scale", "causal")}
    assert options == expected
    assert calls[0]["softmax_scale"] == 0.1 and calls[0]["causal"] is causal
