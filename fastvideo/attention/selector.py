"""Chooses the attention backend of a layer.

Precedence: the `requested` argument, then the environment variable
`FASTVIDEO_ATTENTION_BACKEND`, then a backend the layer supports that declares itself
faster here than the defaults (`AttentionBackend.preferred`: FLASH_ATTN where FlashAttention's
CuTe kernels run), then the layer's first supported backend. A choice that cannot
run here (package missing, wrong device or dtype, not implemented yet) or that the layer does
not support falls back to the layer's next supported backend, with a warning saying why.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Sequence

import torch

from fastvideo.attention.backends.abstract import AttentionBackend, _Backend
from fastvideo.attention.backends.names import backend_from_name

ATTENTION_BACKEND_ENV = "FASTVIDEO_ATTENTION_BACKEND"

# Imported on first use; a backend missing here is not implemented yet.
_BACKEND_MODULES: dict[_Backend, str] = {
    _Backend.TORCH_SDPA: "fastvideo.attention.backends.sdpa",
    _Backend.FLASH_ATTN: "fastvideo.attention.backends.flash_attn",
    _Backend.SLIDING_TILE_ATTN: "fastvideo.attention.backends.sliding_tile",
}


def _unavailable_reason(name: _Backend, head_size: int, dtype: torch.dtype,
                        device: torch.device) -> tuple[AttentionBackend | None, str | None]:
    if name not in _BACKEND_MODULES:
        return None, "not implemented yet"
    backend: AttentionBackend = importlib.import_module(_BACKEND_MODULES[name]).BACKEND
    return backend, backend.unsupported_reason(head_size, dtype, device)


def get_attn_backend(head_size: int, dtype: torch.dtype, device: torch.device | str,
                     supported_backends: Sequence[_Backend],
                     requested: str | _Backend | None = None,
                     use_preferred: bool = True) -> AttentionBackend:
    """The backend a layer supporting `supported_backends` (in order of preference) uses;
    `use_preferred=False` skips the step that takes a backend declaring itself faster."""
    if not supported_backends:
        raise ValueError("supported_backends is empty: a layer must support some backend")
    device = torch.device(device)
    order = list(dict.fromkeys(supported_backends))
    source = "requested" if requested is not None else ATTENTION_BACKEND_ENV
    choice = requested if requested is not None else os.environ.get(ATTENTION_BACKEND_ENV) or None
    if choice is None:
        for name in order if use_preferred else ():
            backend, reason = _unavailable_reason(name, head_size, dtype, device)
            if (reason is None and backend is not None and backend.preferred is not None
                    and backend.preferred(head_size, dtype, device)):
                return backend
    else:
        chosen = backend_from_name(choice)
        if chosen in order:
            order.remove(chosen)
            order.insert(0, chosen)
        else:
            warnings.warn(
                f"attention backend {chosen.name} ({source}) is not supported by this layer "
                f"(supported: {[b.name for b in order]}); using {order[0].name} or the next "
                f"one that can run", stacklevel=2)
    reasons = []
    for name in order:
        backend, reason = _unavailable_reason(name, head_size, dtype, device)
        if reason is None:
            assert backend is not None
            return backend
        reasons.append(f"{name.name}: {reason}")
        if name is not order[-1]:
            warnings.warn(f"attention backend {name.name} cannot run here ({reason}); "
                          f"falling back to the next supported backend", stacklevel=2)
    raise ValueError(f"no attention backend can run head_size={head_size}, dtype={dtype}, "
                     f"device={device.type}: " + "; ".join(reasons))
