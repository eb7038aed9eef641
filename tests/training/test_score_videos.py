"""Scoring videos already made: mp4 decoding, a bulk run's manifest, the report and its CLI."""

from __future__ import annotations

import random

import pytest
import torch

from fastvideo.training.score_videos import accuracy, main, manifest_videos, score_video
from fastvideo.training.scorer import detect
from fastvideo.training.shapes_data import Attributes, random_scene, render_scene
from fastvideo.utils.video_io import read_mp4, write_mp4
from tasks.manifest import manifest_bytes

RED_CIRCLE = Attributes("red", "circle", "left", "blue")
GREEN_SQUARE = Attributes("green", "square", "up", "black")


def _video(tmp_path, attributes: Attributes, name: str) -> str:
    scene = random_scene(random.Random(0), [attributes])
    clip = render_scene(scene, 17, 64, 64)
    return str(write_mp4(clip.float() / 255, tmp_path / name))


def test_read_mp4_gives_back_what_write_mp4_wrote(tmp_path):
    scene = random_scene(random.Random(1), [GREEN_SQUARE])
    clip = render_scene(scene, 17, 64, 48)
    decoded = read_mp4(write_mp4(clip.float() / 255, tmp_path / "a.mp4"))
    assert decoded.dtype == torch.uint8 and decoded.shape == clip.shape == (17, 64, 48, 3)
    # H.264 at CRF 10 with 4:2:0 chroma: close, not exact, and the detector reads the same.
    assert (decoded.float() - clip.float()).abs().mean() < 4.0
    assert detect(decoded) == detect(clip)
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        read_mp4(tmp_path / "missing.mp4")
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(RuntimeError, match="could not read"):
        read_mp4(tmp_path / "bad.mp4")


def test_a_bulk_runs_manifest_is_scored_per_finished_video(tmp_path, capsys):
    red = _video(tmp_path, RED_CIRCLE, "red.mp4")
    green = _video(tmp_path, GREEN_SQUARE, "green.mp4")
    rows = [
        {"item_id": "a", "row": 0, "prompt": RED_CIRCLE.caption(), "status": "succeeded",
         "video_uri": f"file://{red}"},
        # The video shows a green square moving up: colour and shape and direction are wrong.
        {"item_id": "b", "row": 1, "prompt": "a blue circle moves down on a black background",
         "status": "succeeded", "video_uri": green},
        {"item_id": "c", "row": 2, "prompt": "a cat walks across a garden",
         "status": "succeeded", "video_uri": green},
        {"item_id": "d", "row": 3, "prompt": RED_CIRCLE.caption(), "status": "failed",
         "video_uri": None},
    ]
    (tmp_path / "manifest.parquet").write_bytes(manifest_bytes(rows))
    pairs = manifest_videos(tmp_path)
    assert pairs == [(r["prompt"], r["video_uri"]) for r in rows[:3]]
    scored = [score_video(prompt, video) for prompt, video in pairs]
    assert scored[0].right == dict.fromkeys(
        ("colour", "shape", "direction", "background", "all"), True)
    assert scored[1].right == {"colour": False, "shape": False, "direction": False,
                               "background": True, "all": False}
    assert scored[2].right == {}  # not a shapes caption: not counted
    assert accuracy(scored) == {"colour": 0.5, "shape": 0.5, "direction": 0.5,
                                "background": 1.0, "all": 0.5}

    assert main([str(tmp_path / "manifest.parquet")]) == 0
    out = capsys.readouterr().out
    assert "ok    " + RED_CIRCLE.caption() in out
    assert "colour green (wanted blue)" in out and "direction up (wanted down)" in out
    assert "not a shapes caption" in out
    assert "over 2 video(s): colour 50%, shape 50%, direction 50%, background 100%, all 50%" in out


def test_single_videos_and_bad_arguments(tmp_path, capsys):
    red = _video(tmp_path, RED_CIRCLE, "red.mp4")
    assert main(["--video", red, "--prompt", RED_CIRCLE.caption()]) == 0
    assert "over 1 video(s): colour 100%" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--video", red])
    assert "1 --video but 0 --prompt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([])
    assert "either a run folder or --video" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="manifest .*nowhere/manifest.parquet"):
        manifest_videos(tmp_path / "nowhere")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["x"]}), tmp_path / "other.parquet")
    with pytest.raises(ValueError, match=r"not a bulk run's manifest: no \['status', 'video_uri'\]"):
        manifest_videos(tmp_path / "other.parquet")
