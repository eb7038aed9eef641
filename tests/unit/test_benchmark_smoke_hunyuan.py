"""CPU smoke modes of the HunyuanVideo DiT and text encoder benchmarks (tiny configs, fp32):
they run end to end, write the JSON the results tables are made from, and agree with the
reference libraries. Run in this process (not a subprocess) to share the imports."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
FP32_TOL = 1e-5


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_hunyuan_dit_smoke(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    out = tmp_path / "hunyuan.json"
    _script("bench_hunyuan_dit").main([
        "--config", "tiny", "--device", "cpu", "--dtype", "fp32", "--shape", "32x48x9",
        "--text-len", "16", "--text-valid", "7", "--runs", "ours,diffusers,sta", "--iters", "1",
        "--via-folder", str(tmp_path / "ckpt"), "--json-out", str(out)])
    result = json.loads(out.read_text())
    assert result["latent_shape"] == [1, 4, 3, 4, 6] and result["via_folder"]
    assert set(result["median_ms"]) == {"ours", "diffusers"}
    assert result["ratio_ours_over_diffusers"] > 0 and result["output_finite"]
    ours = result["diff_to_diffusers"]["ours"]
    assert ours["max_abs"] < FP32_TOL and ours["rel_l2"] < FP32_TOL
    sta = result["sta"]
    assert sta["compiled"] is False and sta["attention_backends"][0].startswith(
        "SLIDING_TILE_ATTN")
    assert 0 < sta["density"] < 1 and 0 < sta["rel_l2_vs_dense"] < 1  # sparse, yet close
    assert result["ratio_sta_over_dense"] > 0
    assert not list((tmp_path / "ckpt").iterdir())  # the saved checkpoint was removed


def test_sta_window_for_density() -> None:
    bench = _script("bench_hunyuan_dit")
    # 720p: the (33, 45, 80) token grid in (3, 5, 8) tiles is an (11, 9, 10) tile grid.
    window = bench.window_for_density((33, 45, 80), (3, 5, 8), 0.12)
    assert window == (5, 5, 5)  # odd, even shares of each axis: 125 / 990 = 0.126
    # 544p: (33, 34, 60) in (3, 7, 6) tiles, an (11, 5, 10) tile grid.
    assert bench.window_for_density((33, 34, 60), (3, 7, 6), 0.12) == (7, 3, 3)


def test_bench_encoders_smoke(tmp_path: Path) -> None:
    out = tmp_path / "encoders.json"
    _script("bench_encoders").main([
        "--tiny", "--device", "cpu", "--dtype", "fp32", "--iters", "1", "--warmup", "0",
        "--valid", "10", "--json-out", str(out)])
    result = json.loads(out.read_text())
    assert set(result["encoders"]) == {"umt5", "llama", "clip"}
    for name, compared in (("umt5", "last_hidden_state"), ("llama", "hidden_states[-3]"),
                           ("clip", "pooler_output")):
        entry = result["encoders"][name]
        assert entry["compared"] == compared
        assert entry["max_abs"] < FP32_TOL and entry["rel_l2"] < FP32_TOL, name
        assert entry["last_hidden_state"]["max_abs"] < FP32_TOL, name
        assert entry["median_ms"]["ours"] > 0 and entry["ratio_ours_over_transformers"] > 0
    assert result["encoders"]["umt5"]["valid_tokens"] == 10  # padded prompts
