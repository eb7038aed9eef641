"""benchmarks/make_random_wan.py: its `--small` checkpoint loads in diffusers and runs in our
engine, and its full sizes (built on `meta`, no memory) are Wan2.1-T2V-1.3B's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "make_random_wan.py"


def _run(*args: str, tmp_path: Path) -> dict:
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), *args, "--json-out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("random-wan")
    result = _run("--small", "--device", "cpu", "--output", str(tmp / "ckpt"), tmp_path=tmp)
    return tmp / "ckpt", result


def test_small_writes_every_component_with_timings(small: tuple[Path, dict]) -> None:
    path, result = small
    assert result["output"] == str(path)
    components = {"tokenizer", "text_encoder", "transformer", "vae", "scheduler"}
    assert components | {"model_index", "total"} == set(result["seconds"])
    assert all(s >= 0 for s in result["seconds"].values())
    assert all((path / name).is_dir() for name in components)
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"


def test_small_loads_in_diffusers(small: tuple[Path, dict]) -> None:
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(small[0])
    assert type(pipe.transformer).__name__ == "WanTransformer3DModel"
    assert type(pipe.text_encoder).__name__ == "UMT5EncoderModel"
    assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler"
    assert pipe.scheduler.config.prediction_type == "flow_prediction"
    tok = pipe.tokenizer
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.model_max_length == 512
    assert pipe.text_encoder.dtype == torch.bfloat16


def test_small_generates_finite_video_in_our_engine(small: tuple[Path, dict]) -> None:
    from fastvideo import VideoGenerator

    result = VideoGenerator.from_pretrained(small[0], device="cpu").generate_video(
        "a cat", height=32, width=32, num_frames=5, num_inference_steps=2)
    assert result.frames.shape[0] == 5
    assert torch.isfinite(result.frames.float()).all()
    assert torch.isfinite(result.latents).all()


def test_full_sizes_on_meta_have_the_real_parameter_counts(tmp_path: Path) -> None:
    params = _run("--device", "meta", tmp_path=tmp_path)["params"]
    assert params == {"text_encoder": 5_680_910_336, "transformer": 1_418_996_800,
                      "vae": 126_892_531}
