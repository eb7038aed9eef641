"""Typed configs from `config.json` dicts: the checks every model config shares."""

from __future__ import annotations

import dataclasses
from typing import Any


def strict_fields(cls: type, config: dict[str, Any], model: str) -> dict[str, Any]:
    """`config` without the `_`-prefixed metadata keys (diffusers'); ValueError naming any
    key `cls` has no field for (a DiT config we do not understand must not load)."""
    known = {f.name for f in dataclasses.fields(cls)}
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"unknown {model} config keys {unknown}; known: {sorted(known)}")
    return config


def used_fields(cls: type, config: dict[str, Any]) -> dict[str, Any]:
    """The keys of `config` that `cls` has fields for (an encoder's `config.json` also holds
    the decoder's, generation and tokenizer settings, which it does not use)."""
    known = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in config.items() if k in known}
