"""The trained shapes model in models/shapes-demo (issue 17): it is a Diffusers Wan folder
within budget, `make demo`'s prompts are held-out captions, and it follows held-out prompts.

The accuracy test generates 32 clips at the evaluation defaults (64x64x17, 20 steps, CFG 5),
~2 minutes on 2 cores. It uses all of torch's threads, unlike tests/training/."""

from __future__ import annotations

import json
from pathlib import Path

from fastvideo.training.evaluate import EvalConfig, evaluate
from fastvideo.training.shapes_data import parse_caption, split_combinations

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "shapes-demo"


def test_the_shipped_folder_is_a_wan_pipeline_within_budget():
    index = json.loads((MODEL / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    for name in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (MODEL / name).is_dir(), name
    size_mb = sum(f.stat().st_size for f in MODEL.rglob("*.safetensors")) / 1e6
    assert 10.0 < size_mb <= 30.0, size_mb
    trained = json.loads((MODEL / "training.json").read_text())
    assert trained["progress"]["steps"]["dit"] > 1000


def test_demo_prompts_are_held_out_captions():
    _, held_out = split_combinations(EvalConfig().held_out_fraction, EvalConfig().split_seed)
    rows = [json.loads(line) for line in (ROOT / "examples" / "prompts.jsonl").read_text()
            .splitlines() if line.strip()]
    assert len(rows) >= 6
    for row in rows:
        assert parse_caption(row["prompt"]) in held_out, row["prompt"]


def test_the_model_follows_held_out_prompts():
    report = evaluate(MODEL, EvalConfig(), splits=("held_out",))["held_out"]
    print(report)
    # 32 prompts whose combinations training never rendered (seeded: the same every run).
    # Measured 2026-12-03: colour 97%, shape 94%, direction 100%, background 100%, all 91%.
    for name in ("colour", "shape", "direction", "background"):
        assert report[name] >= 0.9, (name, report)
    assert report["all"] >= 0.85, report
