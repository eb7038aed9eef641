"""Keeping `torch.compile`'s work on disk, so a fresh process reuses it.

Compiling the DiT's blocks costs every process ~35 s for Wan 1.3B on a GPU. PyTorch's
on-disk caches let a later process skip most of it: the FX graph cache (Inductor's
generated code per graph), the AOTAutograd cache (the traced forward in front of it) and
Triton's cache (the compiled GPU kernels). Their default location is Inductor's folder
under /tmp (`/tmp/torchinductor_<user>`): node-local and lost on reboot. Pointing them at a
persistent or shared volume (`FastVideoArgs.compile_cache_dir`) keeps them for every
process, container or node that mounts it.

Dynamo still traces the Python in each process (a few seconds); the caches save the
lowering, code generation and C++/Triton compiles behind it. FlashAttention's CuTe kernels
have a disk cache of their own (`configure_kernel_cache`), kept under the same folder.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

# Both are read when used, not at import (`torch/_inductor/runtime/cache_dir_utils.py`),
# so setting them at runtime, before the first compile, moves the caches.
_INDUCTOR_ENV = "TORCHINDUCTOR_CACHE_DIR"
_TRITON_ENV = "TRITON_CACHE_DIR"

_INDUCTOR_COUNTERS = ("fxgraph_cache_hit", "fxgraph_cache_miss", "fxgraph_cache_bypass")
_AOT_COUNTERS = ("autograd_cache_hit", "autograd_cache_miss", "autograd_cache_bypass")


def configure_compile_cache(cache_dir: str | Path) -> Path:
    """Point this process's Inductor, AOTAutograd and Triton caches at `cache_dir`.

    Creates the folder, enables the FX graph and AOTAutograd caches and returns the
    folder's absolute path. Call it before the first compile: what was compiled already
    stays cached where it was (a warning says so). Calling it again with the same folder
    does nothing.
    """
    if isinstance(cache_dir, str) and not cache_dir.strip():
        raise ValueError("compile cache_dir must be a non-empty path")
    if not isinstance(cache_dir, (str, Path)):
        raise ValueError(f"compile cache_dir must be a str or Path, got {type(cache_dir).__name__}")
    path = Path(cache_dir).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise ValueError(f"compile cache_dir {str(path)!r} exists and is not a folder")
    path.mkdir(parents=True, exist_ok=True)

    previous = os.environ.get(_INDUCTOR_ENV)
    if previous is None or Path(previous).resolve() != path:
        if previous is not None and _compiled_anything():
            logger.warning("torch.compile cache moves from %s to %s after compiling: what was "
                           "compiled so far stays cached in %s", previous, path, previous)
        os.environ[_INDUCTOR_ENV] = str(path)
        # Inductor's own default is <cache>/triton/<device>; one folder serves every device
        # (Triton's keys include the target).
        os.environ[_TRITON_ENV] = str(path / "triton")
        # Some of Inductor's cache paths are memoised (e.g. `CacheBase.get_local_cache_path`);
        # its `temporary_cache_dir` clears them the same way when it moves the folder.
        from torch._inductor.utils import clear_caches

        clear_caches()

    # Imported here: importing Inductor pulls in Dynamo (~2 s), which eager runs never need.
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    # TORCHINDUCTOR_FX_GRAPH_CACHE=0 / TORCHINDUCTOR_AUTOGRAD_CACHE=0 force them off over this.
    if not (inductor_config.fx_graph_cache and functorch_config.enable_autograd_cache):
        logger.warning("torch.compile caches are forced off by the environment "
                       "(TORCHINDUCTOR_FX_GRAPH_CACHE / TORCHINDUCTOR_AUTOGRAD_CACHE): "
                       "%s will not be used for them", path)
    logger.info("torch.compile caches in %s", path)
    return path


# FlashAttention's CuTe kernels JIT-compile in every process (~6 s of a fresh worker's first
# Wan video on an H200) unless their own disk cache is on. flash_attn.cute reads these when
# it is imported, which the engine does lazily, at the first kernel.
_CUTE_CACHE_ENABLED_ENV = "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"
_CUTE_CACHE_DIR_ENV = "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"
_CUTE_MODULE = "flash_attn.cute.interface"


def configure_kernel_cache(cache_dir: str | Path) -> Path | None:
    """Keep FlashAttention's compiled CuTe kernels in `<cache_dir>/flash-attn-cute`, for
    every later process. A cache the environment already configures is left alone; returns
    the folder used, or None when the package was imported before (too late: its kernels
    stay in memory for this process, and a warning says so)."""
    if os.environ.get(_CUTE_CACHE_ENABLED_ENV) == "0":
        return None  # switched off on purpose
    if _CUTE_MODULE in sys.modules and os.environ.get(_CUTE_CACHE_ENABLED_ENV) != "1":
        logger.warning("FlashAttention's CuTe kernels were imported before the kernel cache "
                       "was set up: this process compiles them in memory only")
        return None
    path = Path(os.environ.get(_CUTE_CACHE_DIR_ENV)
                or Path(cache_dir).expanduser().resolve() / "flash-attn-cute")
    path.mkdir(parents=True, exist_ok=True)
    os.environ[_CUTE_CACHE_ENABLED_ENV] = "1"
    os.environ.setdefault(_CUTE_CACHE_DIR_ENV, str(path))
    return path


def compile_cache_stats() -> dict[str, int]:
    """This process's FX graph and AOTAutograd cache hits, misses and bypasses so far.

    Keys are the counter names of `torch._dynamo.utils.counters` (`fxgraph_cache_hit`,
    `fxgraph_cache_miss`, `fxgraph_cache_bypass`, `autograd_cache_hit`, ...). A bypass is
    a graph the cache cannot hold (it compiles every time).
    """
    from torch._dynamo.utils import counters

    stats = {name: int(counters["inductor"][name]) for name in _INDUCTOR_COUNTERS}
    stats.update({name: int(counters["aot_autograd"][name]) for name in _AOT_COUNTERS})
    return stats


_COMPILE_PARTS = {
    "total": "_compile.compile_inner",
    "dynamo_tracing": "bytecode_tracing",
    "backend": "OutputGraph.call_user_compiler",
    "loading_compiled_code": "PyCodeCache.load_by_key_path",
    "waiting_for_kernel_compiles": "async_compile.wait",
}


def compile_seconds() -> dict[str, float]:
    """Seconds this process has spent in `torch.compile` so far, whole and in parts, by
    Dynamo's own timers: tracing the Python, the backend (Inductor: lowering and code
    generation, or reading them from the cache), loading the compiled code and waiting for
    kernel compiles. What a fresh process's first call pays on a warm cache shows here."""
    if "torch._dynamo" not in sys.modules:
        return dict.fromkeys(_COMPILE_PARTS, 0.0)
    from torch._dynamo.utils import compile_times

    headers, values = compile_times(repr="csv", aggregate=True)
    times = dict(zip(headers, values))
    return {name: round(float(times.get(key, 0.0)), 3) for name, key in _COMPILE_PARTS.items()}


def _compiled_anything() -> bool:
    if "torch._dynamo" not in sys.modules:  # nothing compiled; don't pay Dynamo's import
        return False
    return any(compile_cache_stats().values())
