"""Activation functions by name, as model configs spell them."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    # diffusers calls the tanh approximation "gelu-approximate" (FeedForward) and
    # "gelu_tanh" (PixArtAlphaTextProjection).
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "gelu-approximate": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
}


def get_act_fn(name: str) -> nn.Module:
    """A new activation module for `name`; ValueError listing the known names otherwise."""
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(_ACTIVATIONS)}") from None
