"""What an attention backend needs to know about the current forward beyond q/k/v, passed
down explicitly: the denoising stage → the DiT's forward → its blocks → the attention layer
→ the backend's `forward(q, k, v, metadata)`. Dense backends ignore it; sliding tile
attention reads its windows, grid and text length from it. Kept apart from the backends so
models import it without FlexAttention."""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field

import torch

from fastvideo.attention.sta_config import STAConfig

Grid = tuple[int, int, int]


@dataclass(frozen=True, kw_only=True)
class AttentionMetadata:
    """Per-forward facts for the attention backends; each caller fills in what it knows."""

    sta_config: STAConfig | None = None
    """Sliding tile windows (set by the denoising stage); None: no STA configured."""
    step: int = 0
    """Denoising step index (STA windows may change with it)."""
    grid: Grid | None = None
    """Latent token grid (T, H, W) after patchify, as the DiT flattens it (set by the DiT)."""
    num_text_tokens: int = 0
    """Text tokens appended after the video tokens in the self-attention sequence."""
    head_offset: int = 0
    """Global index of the backend's head 0: under sequence parallelism the first head this
    rank holds after the all-to-all (set by `DistributedAttention`)."""
    # What a compiled block passes to sliding tile attention's custom op instead of `step`
    # and `sta_config`: a tensor (a graph input, so a new step recompiles nothing) and an
    # int naming the config (the same at every step, so one guard for the whole run).
    step_tensor: torch.Tensor = field(init=False, repr=False, compare=False)
    sta_key: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # On the CPU whatever the default device: the op reads it without a GPU sync.
        object.__setattr__(self, "step_tensor",
                           torch.tensor([self.step], dtype=torch.int64, device="cpu"))
        object.__setattr__(self, "sta_key", -1 if self.sta_config is None
                           else sta_config_key(self.sta_config))


_sta_lock = threading.Lock()
_sta_keys: dict[str, int] = {}
_sta_configs: list[STAConfig] = []


def sta_config_key(config: STAConfig) -> int:
    """A small int for `config`, the same for equal configs within this process."""
    key = _sta_keys.get(config.canonical)
    if key is None:
        with _sta_lock:
            key = _sta_keys.setdefault(config.canonical, len(_sta_configs))
            if key == len(_sta_configs):
                _sta_configs.append(config)
    return key


def sta_config_for_key(key: int) -> STAConfig | None:
    """The config `sta_config_key` gave `key` (-1: None)."""
    return None if key < 0 else _sta_configs[key]


@torch.compiler.disable
def with_fields(metadata: AttentionMetadata, **changes: object) -> AttentionMetadata:
    """`dataclasses.replace`, kept out of compiled graphs: traced, it reads every field and
    Dynamo guards on each, so a compiled block would recompile at every denoising step."""
    return dataclasses.replace(metadata, **changes)
