"""CPU smoke mode of `benchmarks/bench_speed_tricks.py` (the 480p GPU column of the speed
tricks table): every trick runs, and a forced step-cache schedule runs the blocks on the
share of steps asked for."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def _script() -> ModuleType:
    path = ROOT / "benchmarks" / "bench_speed_tricks.py"
    spec = importlib.util.spec_from_file_location("bench_speed_tricks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_computed_steps_spreads_the_work() -> None:
    bench = _script()
    assert bench.computed_steps(50, 1.0) == set(range(50))
    assert bench.computed_steps(50, 0.5) >= {0, 49} and len(bench.computed_steps(50, 0.5)) == 25
    assert bench.computed_steps(4, 0.0) == {0, 3}


def test_forced_schedule_runs_the_blocks_on_those_steps(tiny_wan_path) -> None:
    from fastvideo import VideoGenerator

    bench = _script()
    generator = VideoGenerator.from_pretrained(tiny_wan_path, device="cpu", batch_cfg=True,
                                               step_cache_threshold=1.0)
    runs: list[int] = []
    handle = generator.pipeline.get_module("transformer").blocks[0].register_forward_pre_hook(
        lambda module, args: runs.append(1))
    request = dict(prompt="a cat", height=32, width=48, num_frames=5, num_inference_steps=6)
    with bench.forced_schedule(0.5, 6):
        generator.generate_video(**request)
    handle.remove()
    assert len(runs) == 3  # steps 0, 2 (or 3) and 5, guidance batched


def test_bench_speed_tricks_smoke(tmp_path: Path) -> None:
    out = tmp_path / "tricks.json"
    _script().main(["--smoke", "--json-out", str(out)])
    result = json.loads(out.read_text())
    assert set(result["seconds"]) >= {"baseline", "2 steps", "guidance for the first 50%",
                                      "step cache, blocks on 50% of the steps",
                                      "STA window (1, 2, 2), 1 dense steps"}
    assert result["vs_baseline"]["baseline"] == 1.0
    assert all(v > 0 for v in result["seconds"].values())
