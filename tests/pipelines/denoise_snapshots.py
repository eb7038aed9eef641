"""A pipeline run up to its denoising stage, then denoised whole with a copy of the batch
kept after every step: what resume tests start from."""

from __future__ import annotations

import copy
from typing import Any

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.forward_batch import ForwardBatch


def denoise_with_snapshots(pipeline: Any, batch: ForwardBatch, args: FastVideoArgs
                           ) -> tuple[Any, ForwardBatch, dict[int, ForwardBatch]]:
    """(the denoising stage, the uninterrupted result, step -> batch after that step)."""
    for name, stage in pipeline.stages.items():
        if name == "denoising_stage":
            break
        batch = stage(batch, args)
    denoise = pipeline.get_stage("denoising_stage")
    snapshots: dict[int, ForwardBatch] = {}
    denoise.on_step_end = lambda b, step, total: snapshots.setdefault(step, copy.deepcopy(b))
    try:
        whole = denoise(copy.deepcopy(batch), args)
    finally:
        denoise.on_step_end = None
    return denoise, whole, snapshots
