"""The generate flow equals the engine called directly: in-process, denoising under torchrun,
and every stage on a warm worker."""

from __future__ import annotations

from pathlib import Path

import torch

from fastvideo import VideoGenerator
from flows.generate import generate
from tests.flows.helpers import PROMPTS, TINY, checkpoint_latents, task_states


def test_generate_inprocess_torchrun_and_worker_match_the_engine(
        prefect_server, worker_dir: Path, tiny_wan_path: Path, tmp_path: Path) -> None:
    request = dict(prompt=PROMPTS[0], negative_prompt="blurry, static", seed=7, **TINY)
    rows = {}
    for dispatch in ("inprocess", "torchrun", "worker"):
        state = generate(output=str(tmp_path / dispatch), model_path=str(tiny_wan_path),
                         dispatch=dispatch, checkpoint_every=2, return_state=True,
                         **request)
        assert state.is_completed(), state.message
        rows[dispatch] = state.result()
        assert Path(rows[dispatch]["video_uri"].removeprefix("file://")).stat().st_size > 0
        names = task_states(state.state_details.flow_run_id)
        # A shard on the worker is one task; otherwise one task per stage.
        prefix = "generate-shard-00000-" if dispatch == "worker" else "denoise-shard-00000-"
        assert [n for n in names if n.startswith(prefix)], (dispatch, names)

    direct = VideoGenerator.from_pretrained(tiny_wan_path, device="cpu").generate_video(**request)
    # Same model, seed and ops on CPU fp32, checkpoints in between: bit-identical.
    for dispatch, row in rows.items():
        latents = checkpoint_latents(row["denoise_checkpoint_uri"])[0]
        assert torch.equal(latents, direct.latents), dispatch
    assert rows["inprocess"]["video_sha256"] == rows["torchrun"]["video_sha256"] == \
        rows["worker"]["video_sha256"]
