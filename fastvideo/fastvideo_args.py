"""Typed configuration: `FastVideoArgs` for the engine, `SamplingParam` per request."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fastvideo.utils.cuda_probe import default_device

if TYPE_CHECKING:
    import torch

# Names only: importing torch takes seconds, and a command's first act (starting a warm
# worker, `flows.cli`) reads these configs before it needs torch.
_DTYPES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


def check_dtype_name(name: str) -> str:
    """The canonical name of dtype `name` (`"bf16"` -> `"bfloat16"`), without torch."""
    try:
        return _DTYPES[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown dtype {name!r}; known: {sorted(_DTYPES)}") from None


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """Turn a dtype name (`"bf16"`, `"float32"`, ...) into a `torch.dtype`."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    return getattr(torch, check_dtype_name(name))


def check_step_cache_threshold(value: object) -> None:
    """ValueError unless `value` is None (off) or a finite number > 0."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value) or value <= 0):
        raise ValueError(f"step_cache_threshold must be a finite number > 0 (or None: off), "
                         f"got {value!r}")


def default_batch_cfg(sp_size: int) -> bool:
    """Whether guidance runs as one batch of 2 when `batch_cfg` is unset: under sequence
    parallelism, where the pair's two halves hide each other's all-to-alls. On one GPU a
    video's worth of tokens fills it and the pair gains nothing (an H200 at Wan 480p ran
    two forwards 1.6% faster); on CPU the two are as fast (benchmarks/RESULTS.md)."""
    return sp_size > 1


@dataclass(kw_only=True)
class FastVideoArgs:
    """How the engine loads and runs a model. Fixed for the life of a pipeline."""

    model_path: str
    """A Diffusers-format folder (with `model_index.json`)."""
    device: str = dataclasses.field(default_factory=default_device)
    """`"cuda"`, `"cuda:N"` or `"cpu"`; defaults to CUDA when available."""
    dtype: str | None = None
    """Compute dtype of the DiT and text encoder: bf16 on CUDA, fp32 on CPU when unset."""
    vae_dtype: str = "float32"
    """The Wan VAE is run in fp32 by default, as diffusers' reference pipeline does."""
    num_gpus: int = 1
    """Number of worker processes (one per GPU; CPU processes on gloo without GPUs). More
    than `sp_size x tp_size` makes several model replicas that split a batch of prompts."""
    tp_size: int = 1
    """Tensor-parallel size for the encoders."""
    sp_size: int | None = None
    """Sequence-parallel size for the DiT; defaults to `num_gpus`."""
    attention_backend: str | None = None
    """Force an attention backend by name (e.g. `"TORCH_SDPA"`); else the layer's default."""
    pipeline_name: str | None = None
    """Pipeline class to use; defaults to the `_class_name` in `model_index.json`."""
    enable_torch_compile: bool = False
    """Compile the DiT's repeated blocks with `torch.compile` (one compile per video shape)."""
    compile_cache_dir: str | None = None
    """Where compiled code persists across processes: torch.compile's caches (Inductor FX
    graph + AOTAutograd + Triton; with enable_torch_compile) and FlashAttention's CuTe
    kernels (compiled or not). None: PyTorch's default folder under /tmp, and CuTe kernels
    compiled in every process."""
    sta_config: str | None = None
    """JSON of sliding tile attention windows (`python -m fastvideo.entrypoints.sta_search`);
    setting it selects the SLIDING_TILE_ATTN backend when `attention_backend` is unset."""
    batch_cfg: bool | None = None
    """Run each guidance step's conditional and unconditional forwards as one batch of 2,
    whose all-to-alls overlap each other's attention under sequence parallelism (Wan 1.3B
    480p on 4 H100s, sp=4: 4% faster per step; as fast at sp=2). False: two forwards, as
    diffusers' pipeline runs them (half the activation memory; on one H200 at Wan 480p
    1.6% faster per dense step than the pair). None: pair under sequence parallelism only
    (`default_batch_cfg`)."""
    step_cache_threshold: float | None = None
    """Skip the DiT's blocks on a step whose first-block modulated input has changed little
    since the last computed step, reusing that step's block residual (in the manner of
    TeaCache): the relative L1 changes are summed from the last computed step, and a step is
    computed when the sum reaches this threshold. None: every step computed. Larger skips
    more (docs/attention_and_speed.md has accuracy against speed); the first and last steps
    are always computed."""

    def __post_init__(self) -> None:
        check_step_cache_threshold(self.step_cache_threshold)
        if self.num_gpus < 1:
            raise ValueError(f"num_gpus must be >= 1, got {self.num_gpus}")
        if self.sp_size is None:
            self.sp_size = self.num_gpus
        if self.tp_size < 1 or self.sp_size < 1:
            raise ValueError(f"tp_size and sp_size must be >= 1, got {self.tp_size}, {self.sp_size}")
        if self.num_gpus % (self.sp_size * self.tp_size):
            raise ValueError(
                f"num_gpus={self.num_gpus} must be a multiple of sp_size x tp_size "
                f"({self.sp_size} x {self.tp_size})")
        if self.batch_cfg is None:
            self.batch_cfg = default_batch_cfg(self.sp_size)
        if self.sta_config is not None:
            # A window config asks for sliding tile attention; any other backend would ignore it.
            if self.attention_backend is None:
                self.attention_backend = "SLIDING_TILE_ATTN"
            elif self.attention_backend.upper() != "SLIDING_TILE_ATTN":
                raise ValueError(f"sta_config is used by the SLIDING_TILE_ATTN backend only, but "
                                 f"attention_backend={self.attention_backend!r}; drop one of them")
            if not Path(self.sta_config).is_file():
                raise ValueError(f"sta_config {self.sta_config!r} is not a file (write one with "
                                 "python -m fastvideo.entrypoints.sta_search)")
        if self.dtype is None:
            self.dtype = "float32" if self.device == "cpu" else "bfloat16"
        for name in (self.dtype, self.vae_dtype):
            if not isinstance(name, str):  # a torch.dtype: torch is imported already
                parse_dtype(name)
            else:
                check_dtype_name(name)

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)

    @property
    def torch_vae_dtype(self) -> torch.dtype:
        return parse_dtype(self.vae_dtype)


NEUTRAL_OPTIONS: dict[str, object] = {"guidance_end": 1.0}
"""Request options added after outputs were made, each with the value that does what runs
made before it did: at that value an option stays out of checkpoint keys and a manifest row
without it counts as the same request, so upgrading redoes no work."""


@dataclass(kw_only=True)
class SamplingParam:
    """Per-request sampling options. Defaults follow the Wan2.1 480p preset."""

    negative_prompt: str | None = None
    height: int = 480
    width: int = 832
    num_frames: int = 81
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    seed: int = 0
    max_sequence_length: int = 512
    image: str | None = None
    """Image-to-video: the first frame, a local path or a store URI (s3://...)."""
    embedded_guidance_scale: float | None = None
    """Guidance-distilled DiTs (HunyuanVideo): the guidance strength fed to the DiT as an
    input, at no extra forward; None: the family's (other families refuse a value)."""
    guidance_end: float = 1.0
    """Fraction of the denoising steps that use classifier-free guidance; the steps after
    run the conditional branch alone, one DiT forward instead of two. 1.0: every step."""

    def __post_init__(self) -> None:
        end = self.guidance_end
        if (isinstance(end, bool) or not isinstance(end, (int, float)) or not math.isfinite(end)
                or not 0 <= end <= 1):
            raise ValueError(f"guidance_end must be a number in [0, 1], got {end!r}")
        if self.image is not None and (not isinstance(self.image, str) or not self.image):
            raise ValueError(f"image must be a path or URI string, got {self.image!r}")
        for name in ("height", "width", "num_frames", "max_sequence_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.num_inference_steps, int) or self.num_inference_steps < 1:
            raise ValueError(
                f"num_inference_steps must be a positive integer, got {self.num_inference_steps!r}")
        if not isinstance(self.guidance_scale, (int, float)) or not math.isfinite(self.guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {self.guidance_scale!r}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        embedded = self.embedded_guidance_scale
        if embedded is not None and (isinstance(embedded, bool)
                                     or not isinstance(embedded, (int, float))
                                     or not math.isfinite(embedded) or embedded < 0):
            raise ValueError(f"embedded_guidance_scale must be a finite number >= 0, got "
                             f"{embedded!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def option_types(cls, kind: type) -> tuple[str, ...]:
        """The options whose type is `kind` (`int`, `float`, `str`), optional or not."""
        name = kind.__name__
        return tuple(f.name for f in dataclasses.fields(cls)
                     if str(f.type).split(" | ")[0] == name)
