"""`EngineOptions`: the engine settings a batch run fixes for every process that runs its stages.

They are `FastVideoArgs` fields, minus what each process decides for itself (the model
path, which GPU). A run validates them once, at its start, and ships them with its jobs,
so a bad value fails before any model loads, naming the option.

The sliding tile attention windows travel as the config's JSON text, not a path: the
process running the stages may be on another machine. `phase_params` says which options
enter which stage's checkpoint key: only those that change results (the STA windows, the
VAE's dtype, the step cache's threshold).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastvideo.fastvideo_args import FastVideoArgs, check_dtype_name, check_step_cache_threshold
from fastvideo.pipelines.phases import Phase


@dataclass(frozen=True, kw_only=True)
class EngineOptions:
    """Engine settings of a run (see `FastVideoArgs` for each field's meaning)."""

    attention_backend: str | None = None
    """Attention backend of the DiT by name (e.g. "FLASH_ATTN"); None: each layer's fastest."""
    sta_config: str | None = None
    """Sliding tile attention windows as JSON text (`EngineOptions.with_sta_file` reads a
    file); setting it selects the SLIDING_TILE_ATTN backend."""
    enable_torch_compile: bool = False
    """Compile the DiT's blocks (once per video shape and process; see compile_cache_dir)."""
    batch_cfg: bool | None = None
    """Guidance's two DiT forwards as one batch of 2; None: under sequence parallelism only
    (`fastvideo_args.default_batch_cfg`)."""
    vae_dtype: str = "float32"
    """Dtype of the VAE decode."""
    compile_cache_dir: str | None = None
    """Where compiled kernels are kept across processes, on the node running the stages."""
    step_cache_threshold: float | None = None
    """Skip DiT steps whose modulated input changed little (TeaCache-style), up to this
    accumulated relative change; None: every step computed."""

    def __post_init__(self) -> None:
        if self.attention_backend is not None:
            # The names alone: the backends import torch and the compiler (seconds), and
            # the flows' command line builds options before starting a warm worker.
            from fastvideo.attention.backends.names import backend_from_name

            try:
                backend_from_name(self.attention_backend)
            except ValueError as exc:
                raise ValueError(f"attention_backend: {exc}") from None
        if self.sta_config is not None:
            from fastvideo.attention.sta_config import STAConfig

            if self.attention_backend not in (None, "SLIDING_TILE_ATTN", "sliding_tile_attn"):
                raise ValueError(f"sta_config is used by the SLIDING_TILE_ATTN backend only, but "
                                 f"attention_backend={self.attention_backend!r}; drop one of them")
            try:
                STAConfig.from_dict(json.loads(self.sta_config))
            except (ValueError, TypeError, KeyError) as exc:
                raise ValueError(f"sta_config is not a valid sliding tile attention config: "
                                 f"{exc}") from None
        try:
            check_dtype_name(self.vae_dtype)
        except ValueError as exc:
            raise ValueError(f"vae_dtype: {exc}") from None
        check_step_cache_threshold(self.step_cache_threshold)
        if self.step_cache_threshold is not None:  # 1 and 1.0: one worker, one key
            object.__setattr__(self, "step_cache_threshold", float(self.step_cache_threshold))
        if not isinstance(self.enable_torch_compile, bool):
            raise ValueError(f"enable_torch_compile must be true or false, got "
                             f"{self.enable_torch_compile!r}")
        if self.batch_cfg is not None and not isinstance(self.batch_cfg, bool):
            raise ValueError(f"batch_cfg must be true, false or null (pair under sequence "
                             f"parallelism only), got {self.batch_cfg!r}")

    @classmethod
    def with_sta_file(cls, sta_config_path: str | None, **options: Any) -> EngineOptions:
        """Options whose STA windows are read from a file (None: no STA)."""
        text = None
        if sta_config_path is not None:
            path = Path(sta_config_path)
            if not path.is_file():
                raise ValueError(f"sta_config {sta_config_path!r} is not a file (write one with "
                                 "python -m fastvideo.entrypoints.sta_search)")
            text = path.read_text()
        return cls(sta_config=text, **options)

    @property
    def sta_digest(self) -> str | None:
        """sha256 of the STA windows as parsed (formatting of the JSON does not count)."""
        if self.sta_config is None:
            return None
        canonical = json.dumps(json.loads(self.sta_config), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def phase_params(self, phase: Phase | None) -> dict[str, Any]:
        """What of these options changes the output of `phase`, for its checkpoint key.

        Sparse attention and skipping steps (the step cache) change the denoise phase's
        output, and the VAE's dtype that of every phase using the VAE; the backend of dense
        attention, compiling and batching guidance compute the same thing (to rounding), so
        they stay out and a run may switch them and reuse work.
        """
        params: dict[str, Any] = {}
        if phase is None:
            return params
        if phase.denoise and self.sta_config is not None:
            params["sta"] = self.sta_digest
        if phase.denoise and self.step_cache_threshold is not None:
            params["step_cache"] = self.step_cache_threshold  # a float since __post_init__
        vae_dtype = check_dtype_name(self.vae_dtype)
        if "vae" in phase.modules and vae_dtype != "float32":
            params["vae_dtype"] = f"torch.{vae_dtype}"  # as str(torch.bfloat16) writes it
        return params

    def to_args(self, model_path: str, device: str, dtype: str | None,
                **parallel: Any) -> FastVideoArgs:
        """The `FastVideoArgs` of a process running stages on `device` (`parallel`: num_gpus,
        sp_size, tp_size)."""
        options = asdict(self)
        options["sta_config"] = sta_file(self.sta_config) if self.sta_config else None
        return FastVideoArgs(model_path=model_path, device=device, dtype=dtype, **options,
                             **parallel)


def sta_file(text: str) -> str:
    """A file holding the STA config `text` (FastVideoArgs takes a path), named by its digest."""
    folder = Path(tempfile.gettempdir()) / "fastvideo-sta"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha256(text.encode()).hexdigest()[:24]}.json"
    if not path.is_file():
        tmp = path.with_suffix(f".{id(text)}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return str(path)
