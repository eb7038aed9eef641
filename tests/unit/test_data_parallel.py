"""Splitting a request across model replicas and merging the results back."""

from __future__ import annotations

import pytest
import torch

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.forward_batch import NOISE_ROWS_KEY, ForwardBatch
from fastvideo.pipelines.stages.geometry import LatentGeometry
from fastvideo.pipelines.stages.latent_preparation import LatentPreparationStage
from fastvideo.worker.data_parallel import item_ranges, merge_batches, split_batch


@pytest.mark.parametrize(("items", "replicas", "expected"), [
    (5, 2, [(0, 2), (2, 5)]),
    (4, 4, [(0, 1), (1, 2), (2, 3), (3, 4)]),
    (1, 4, [(0, 1)]),  # fewer items than replicas: the others idle
])
def test_item_ranges(items: int, replicas: int, expected: list[tuple[int, int]]) -> None:
    assert item_ranges(items, replicas) == expected


def test_split_then_merge_keeps_item_order() -> None:
    batch = ForwardBatch(prompt=["a", "b", "c"], negative_prompt=["n"] * 3, seed=4,
                         timesteps=torch.arange(3.0), timings={"x": 1.0})
    parts = [split_batch(batch, s, e) for s, e in item_ranges(3, 2)]
    assert [p.prompt for p in parts] == [["a"], ["b", "c"]]
    assert [p.extra[NOISE_ROWS_KEY] for p in parts] == [[0, 3], [1, 3]]
    assert all(torch.equal(p.timesteps, batch.timesteps) for p in parts)  # not per item
    for i, part in enumerate(parts):
        part.output = torch.full((part.batch_size, 2), float(i))
        part.timings = {"x": 1.0 + i, "y": 2.0}
    merged = merge_batches(parts, batch)
    assert merged.prompt == ["a", "b", "c"] and merged.negative_prompt == ["n"] * 3
    assert merged.output[:, 0].tolist() == [0.0, 1.0, 1.0]
    assert merged.timings == {"x": 2.0, "y": 2.0}  # the slowest replica's
    assert NOISE_ROWS_KEY not in merged.extra


def test_noise_rows_are_the_whole_requests_rows() -> None:
    stage = LatentPreparationStage(LatentGeometry(spatial_factor=8, temporal_factor=4,
                                                  latent_channels=4, patch_size=(1, 2, 2)))
    args = FastVideoArgs(model_path="unused", device="cpu")
    whole = stage(ForwardBatch(prompt=["a", "b", "c"], height=32, width=32, num_frames=5,
                               seed=7), args).latents
    part = split_batch(ForwardBatch(prompt=["a", "b", "c"], height=32, width=32, num_frames=5,
                                    seed=7), 1, 3)
    assert torch.equal(stage(part, args).latents, whole[1:3])
    bad = ForwardBatch(prompt=["a", "b"], seed=7, extra={NOISE_ROWS_KEY: [2, 3]})
    with pytest.raises(ValueError, match=r"extra\['noise_rows'\]=\[2, 3\] does not hold the "
                                         r"batch's 2 items"):
        stage(bad, args)
