"""The GPU benchmarks' CPU smoke modes: they run end to end and write the JSON the results
tables are made from, so a change to the engine cannot silently break them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str, tmp_path: Path) -> dict:
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args,
                           "--json-out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_bench_attention_smoke(tmp_path: Path) -> None:
    result = _run("bench_attention.py", "--smoke", "--cross-kv-len", "5", tmp_path=tmp_path)
    rows = result["results"]
    assert rows["flash_cute"] == {"skipped": "needs a CUDA device, got cpu"}
    assert rows["flex_dense"]["rel_err"] < 1e-5
    # STA through the backend and its kernel alone agree with the explicitly masked SDPA.
    assert rows["sta_1x2x2_kernel"]["masked_sdpa_rel_err"] < 1e-5
    assert "sta_1x2x2" in rows and "sta_1x1x1_kernel" in rows


def test_bench_dit_smoke_with_backends_and_sta(tmp_path: Path) -> None:
    result = _run("bench_dit.py", "--config", "tiny", "--device", "cpu", "--dtype", "fp32",
                  "--height", "64", "--width", "64", "--frames", "9", "--text-len", "16",
                  "--iters", "1", "--warmup", "0", "--also-backends", "TORCH_SDPA",
                  "--sta-windows", "1,1,1", tmp_path=tmp_path)
    assert set(result["median_ms"]) == {"diffusers", "ours", "ours_TORCH_SDPA"}
    assert result["attention_backends"]["ours_TORCH_SDPA"] == ["TORCH_SDPA"]
    assert all(diff < 1e-5 for diff in result["max_abs_diff_to_diffusers"].values())
    (sta,) = result["sta"]
    assert sta["kernel"] == "flex" and sta["window"] == [1, 1, 1]
    assert 0 < sta["rel_l2_vs_dense"] < 1  # sparse, so not equal to dense, but close


def test_bench_bulk_smoke(tmp_path: Path) -> None:
    result = _run("bench_bulk.py", "--smoke", "--no-compile", "--num-prompts", "2",
                  "--phases", "diffusers,sta,fresh_sta", "--workdir", str(tmp_path / "work"),
                  tmp_path=tmp_path)
    diffusers, sta = result["phases"]["diffusers"], result["phases"]["sta"]
    assert diffusers["videos"] == sta["videos"] == 2
    assert diffusers["steady_s_per_video"] > 0 and sta["steady_s_per_video"] > 0
    # The option reached the warm worker, and the GPU lane's period was measured.
    assert sta["attention_backends"]["requested"] == ["SLIDING_TILE_ATTN"]
    assert sta["engine_s_per_video"] > 0 and "orchestration_checkpoint_s_per_video" in sta
    assert {e["lane"] for e in sta["timeline"]} == {"gpu", "post"}
    # A new worker on the cache `sta` left, one more prompt, STA still requested.
    fresh = result["phases"]["fresh_sta"]
    assert fresh["videos"] == 1 and fresh["first_video_s"] > 0
    assert fresh["attention_backends"]["requested"] == ["SLIDING_TILE_ATTN"]
    # Its worker's start and first item, from the worker's log.
    assert any("after its spawn" in line for line in fresh["worker_start"])
    assert any("first denoise of this process" in line for line in fresh["worker_start"])
    # Run again in the same folder (an A/B on one machine): the video is made again, not
    # found made.
    again = _run("bench_bulk.py", "--smoke", "--no-compile", "--num-prompts", "2",
                 "--phases", "fresh_sta", "--workdir", str(tmp_path / "work"),
                 tmp_path=tmp_path)["phases"]["fresh_sta"]
    assert again["videos"] == 1 and len(again["timeline"]) == 2


def test_bench_vae_decode_smoke(tmp_path: Path) -> None:
    result = _run("bench_vae_decode.py", "--device", "cpu", "--latent", "2,4,4", "--iters", "1",
                  "--variants", "diffusers,channels_last,engine,bf16", "--profile", "engine",
                  tmp_path=tmp_path)
    assert result["channels_last"]["max_abs_diff"] < 1e-5  # the same computation
    assert result["engine"]["max_abs_diff"] < 1e-5
    assert result["profiled_variant"] == "engine" and result["profile_ms"]
    assert 0 < result["bf16"]["max_abs_diff"] < 0.2
    assert result["diffusers"]["median_s"] > 0


def test_bench_decode_overlap_smoke(tmp_path: Path) -> None:
    """The DiT's forwards alone and beside a decode, in one process (CPU: the figures only
    show that every part ran)."""
    result = _run("bench_decode_overlap.py", "--smoke", tmp_path=tmp_path)
    assert set(result["ms_per_forward"]) == {"alone", "beside_decode"}
    assert all(ms > 0 for ms in result["ms_per_forward"].values())
    assert set(result["decode_s"]) == {"beside_decode"}
    assert all(len(seconds) >= 1 for seconds in result["decode_s"].values())


def test_profile_denoise_smoke(tmp_path: Path) -> None:
    """One whole denoise in the engine's loop, per step and profiled (CPU: the tiny model,
    STA with 2 dense steps of 4; the figures only show that every part ran)."""
    sta = tmp_path / "sta.json"
    sta.write_text(json.dumps({"tile_size": [1, 2, 2], "num_full_steps": 2,
                               "default_window": [1, 1, 1]}))
    result = _run("profile_denoise.py", "--smoke", "--sta-config", str(sta), tmp_path=tmp_path)
    assert result["sta"] and result["steps"] == 4 and len(result["step_ms"]) == 4
    assert result["dense_step_ms_median"] > 0 and result["sparse_step_ms_median"] > 0
    assert result["loop_s"] > 0 and result["profiled_loop_s"] > 0
