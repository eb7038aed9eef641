"""Capture and restore a diffusers scheduler's mutable state, for resuming mid-denoise.

Multistep schedulers (UniPC, DPM-Solver) keep the model outputs of earlier steps, so
resuming from saved latents alone would change the result. The state is a flat dict of
tensors and JSON scalars (lists flattened to `name.0`, `name.1`, ... plus `name.__len__`)
so it checkpoints as safetensors + parquet without pickling.
"""

from __future__ import annotations

from typing import Any

import torch

_SCALARS = (bool, int, float, str, type(None))
_LEN = ".__len__"


def _is_state_value(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, *_SCALARS))


def get_scheduler_state(scheduler: Any) -> dict[str, Any]:
    """Every tensor, scalar and list of those among the scheduler's attributes."""
    state: dict[str, Any] = {}
    for name, value in vars(scheduler).items():
        if isinstance(value, (list, tuple)) and all(_is_state_value(v) for v in value):
            state[name + _LEN] = len(value)
            for i, item in enumerate(value):
                state[f"{name}.{i}"] = item.clone() if isinstance(item, torch.Tensor) else item
        elif isinstance(value, torch.Tensor):
            state[name] = value.clone()
        elif isinstance(value, _SCALARS):
            state[name] = value
    return state


def load_scheduler_state(scheduler: Any, state: dict[str, Any], device: torch.device | str) -> None:
    """Restore what `get_scheduler_state` captured.

    A tensor attribute the scheduler already has keeps that tensor's device (diffusers
    keeps `sigmas` on the CPU on purpose); everything else goes to `device`.
    """
    lists = {key[: -len(_LEN)]: int(value) for key, value in state.items() if key.endswith(_LEN)}
    for name, length in lists.items():
        setattr(scheduler, name, [_to(state[f"{name}.{i}"], device) for i in range(length)])
    for key, value in state.items():
        if key.endswith(_LEN) or key.rsplit(".", 1)[0] in lists:
            continue
        current = getattr(scheduler, key, None)
        setattr(scheduler, key, _to(value, current.device if isinstance(current, torch.Tensor) else device))


def _to(value: Any, device: torch.device | str) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value
