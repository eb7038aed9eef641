"""`compile_cache_dir`: a second process reuses the first one's compiled blocks from disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastvideo.models.compile_cache import compile_cache_stats, configure_compile_cache
from fastvideo.testing.tiny_wan import make_tiny_wan

REPO = Path(__file__).resolve().parents[2]
MARKER = "COMPILE_CACHE_RESULT "

# One fresh process: load with compile and the cache dir, generate one video, report.
_WORKER = f"""
import json, sys, time
import torch
from fastvideo import VideoGenerator
from fastvideo.models.compile_cache import (
    compile_cache_stats, compile_seconds, configure_compile_cache)

model_path, cache_dir, latents_path = sys.argv[1:4]
before = compile_seconds()
start = time.perf_counter()
generator = VideoGenerator.from_pretrained(model_path, device="cpu", enable_torch_compile=True,
                                           compile_cache_dir=cache_dir)
loaded = time.perf_counter()
result = generator.generate_video("a cat walks across a sunny garden", seed=3, height=32,
                                  width=32, num_frames=5, num_inference_steps=2,
                                  guidance_scale=5.0)
done = time.perf_counter()
torch.save(result.latents, latents_path)
stats = compile_cache_stats()
compile_s = compile_seconds()

# Moving the caches after compiling warns (what was compiled stays in the old folder).
import logging
warnings = []
handler = logging.Handler()
handler.emit = lambda record: warnings.append(record.getMessage())
logging.getLogger("fastvideo.models.compile_cache").addHandler(handler)
configure_compile_cache(cache_dir)  # the same folder: nothing to say
same_dir_warnings = len(warnings)
configure_compile_cache(cache_dir + "_moved")
moved_warned = any("after compiling" in message for message in warnings)
print({MARKER!r} + json.dumps({{"stats": stats, "load_s": loaded - start,
                                "compile_before": before, "compile_s": compile_s,
                                "generate_s": done - loaded,
                                "same_dir_warnings": same_dir_warnings,
                                "moved_warned": moved_warned}}), flush=True)
"""


def _run_worker(model_path: Path, cache_dir: Path, latents_path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # The test's process may carry its own cache settings; each worker must use only ours.
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE",
                 "TORCHINDUCTOR_AUTOGRAD_CACHE"):
        env.pop(name, None)
    proc = subprocess.run(
        [sys.executable, "-c", _WORKER, str(model_path), str(cache_dir), str(latents_path)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout}\n{proc.stderr}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    assert lines, f"worker printed no result:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1][len(MARKER):])


def test_second_process_reuses_the_compile_cache(tmp_path: Path) -> None:
    model_path = make_tiny_wan(tmp_path / "tiny_wan")
    cache_dir = tmp_path / "compile_cache"
    first = _run_worker(model_path, cache_dir, tmp_path / "first.pt")
    second = _run_worker(model_path, cache_dir, tmp_path / "second.pt")
    print(f"\nfirst process: {first}\nsecond process: {second}")

    assert first["stats"]["fxgraph_cache_miss"] > 0, first
    assert second["stats"]["fxgraph_cache_hit"] > 0, second
    assert second["stats"]["fxgraph_cache_miss"] == 0, second
    assert any(cache_dir.iterdir()), "nothing was written to the cache dir"
    assert any((cache_dir / "fxgraph").iterdir()) and any((cache_dir / "aotautograd").iterdir())
    assert first["same_dir_warnings"] == 0 and first["moved_warned"], first
    # What compiling cost each process, by Dynamo's timers: nothing before the first call;
    # the cache's hit makes the backend's part (Inductor) shorter, and Dynamo's tracing is
    # paid again.
    assert set(first["compile_before"].values()) == {0.0}, first
    for run in (first, second):
        parts = run["compile_s"]
        assert parts["total"] >= parts["dynamo_tracing"] > 0 and parts["backend"] > 0, parts
    assert second["compile_s"]["backend"] < first["compile_s"]["backend"], (first, second)
    # The cached code is the same code: bit-identical latents.
    assert torch.equal(torch.load(tmp_path / "first.pt"), torch.load(tmp_path / "second.pt"))


@pytest.fixture
def restore_compile_cache(monkeypatch: pytest.MonkeyPatch):
    """Put this process's cache settings back after the test (other tests compile here)."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import clear_caches

    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.delenv(name, raising=False)
    # Torch's config modules break under monkeypatch.setattr's undo: assign them back.
    flags = inductor_config.fx_graph_cache, functorch_config.enable_autograd_cache
    yield
    inductor_config.fx_graph_cache, functorch_config.enable_autograd_cache = flags
    monkeypatch.undo()
    clear_caches()  # forget cache paths memoised under the test's folder


@pytest.mark.usefixtures("restore_compile_cache")
def test_configure_points_inductor_and_triton_at_the_dir(tmp_path: Path) -> None:
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor.codecache import CacheBase
    from torch._inductor.runtime.cache_dir_utils import cache_dir, triton_cache_dir

    CacheBase.get_local_cache_path()  # memoised under the old folder: must be moved too
    inductor_config.fx_graph_cache = False
    target = tmp_path / "nested" / "cache"
    path = configure_compile_cache(str(target))
    assert path == target.resolve() and path.is_dir()
    assert Path(cache_dir()) == path
    assert Path(triton_cache_dir(0)).is_relative_to(path)
    assert CacheBase.get_local_cache_path().is_relative_to(path)
    assert inductor_config.fx_graph_cache and functorch_config.enable_autograd_cache
    assert configure_compile_cache(target) == path  # idempotent
    assert Path(cache_dir()) == path


def test_configure_rejects_bad_dirs(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        configure_compile_cache(a_file)
    with pytest.raises(ValueError, match="non-empty"):
        configure_compile_cache("  ")


def test_stats_have_the_counters() -> None:
    stats = compile_cache_stats()
    assert {"fxgraph_cache_hit", "fxgraph_cache_miss", "autograd_cache_hit",
            "autograd_cache_miss"} <= set(stats)
    assert all(isinstance(v, int) and v >= 0 for v in stats.values())


def test_kernel_cache_keeps_cute_kernels_under_the_dir(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """FlashAttention's CuTe kernels get their disk cache under the compile cache folder,
    unless the environment says otherwise or the package is already imported."""
    import sys

    from fastvideo.models.compile_cache import configure_kernel_cache

    for name in ("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"):
        monkeypatch.setenv(name, "")  # recorded, so what the function sets is undone after
        monkeypatch.delenv(name)
    monkeypatch.delitem(sys.modules, "flash_attn.cute.interface", raising=False)
    path = configure_kernel_cache(tmp_path / "cache")
    assert path == (tmp_path / "cache" / "flash-attn-cute").resolve() and path.is_dir()
    assert os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"] == "1"
    assert os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"] == str(path)
    assert configure_kernel_cache(tmp_path / "other") == path  # once set, kept
    # A folder the user chose wins; a cache switched off stays off.
    monkeypatch.setenv("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", str(tmp_path / "mine"))
    assert configure_kernel_cache(tmp_path / "cache") == tmp_path / "mine"
    monkeypatch.setenv("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "0")
    assert configure_kernel_cache(tmp_path / "cache") is None
    # Imported already without the cache: too late for this process.
    monkeypatch.delenv("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED")
    monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", object())
    assert configure_kernel_cache(tmp_path / "cache") is None
