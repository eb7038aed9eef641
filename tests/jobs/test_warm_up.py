"""A fresh worker's warm-up (`fastvideo.jobs.warm_up`): every stage once on a dummy request
of the run's shape, the DiT once at the first step of each kind, in pieces that stop when
asked (a request arrived)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.jobs.warm_up import warm_up_pipeline
from fastvideo.pipelines.builder import build_pipeline

HINTS = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 12,
         "guidance_end": 0.5}


@pytest.fixture(scope="module")
def pipeline(tiny_wan_path: Path):
    return build_pipeline(FastVideoArgs(model_path=str(tiny_wan_path), device="cpu"))


def test_every_stage_once_and_the_dit_at_the_first_step_of_each_kind(pipeline) -> None:
    done = warm_up_pipeline(pipeline, HINTS)
    assert done["shape"] == [5, 32, 32] and done["steps"] == 12
    assert done["dit_steps"] == [0, 6]  # guided, then the conditional branch alone
    assert done["stopped_before"] is None and done["seconds"] > 0
    # The family's defaults for what is not given.
    done = warm_up_pipeline(pipeline, {"height": 32, "width": 32, "num_frames": 5,
                                       "num_inference_steps": 3})
    assert done["dit_steps"] == [0] and done["steps"] == 3


def test_it_stops_at_the_next_piece_when_asked(pipeline) -> None:
    asked: list[int] = []

    def stop() -> bool:  # asked before encode-text, prepare-latents, then each DiT step
        asked.append(1)
        return len(asked) > 3

    done = warm_up_pipeline(pipeline, HINTS, stop)
    assert done["dit_steps"] == [0] and done["stopped_before"] == "denoise step 6"
    assert len(asked) == 4  # nothing ran after it said stop
    done = warm_up_pipeline(pipeline, HINTS, lambda: True)
    assert done["dit_steps"] == [] and done["stopped_before"] == "encode-text"
