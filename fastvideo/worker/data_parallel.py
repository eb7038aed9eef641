"""Data parallelism over replicas: a batch of prompts split across model replicas, merged back.

With `num_gpus` larger than `sp_size x tp_size` the workers form `num_gpus / (sp x tp)`
replicas (contiguous ranks, as `parallel_state` lays out the mesh). Each replica runs the
pipeline on its own slice of the prompts. Item i's initial noise is still row i of the
whole batch's noise (`noise_rows`), so a video does not depend on how many replicas
made it.
"""

from __future__ import annotations

import dataclasses

import torch

from fastvideo.forward_batch import NOISE_ROWS_KEY, ForwardBatch

PER_ITEM_LISTS = ("prompt", "negative_prompt")
"""List fields with one entry per item (when their length is the batch size)."""
PER_ITEM_TENSORS = ("prompt_embeds", "negative_prompt_embeds", "image_embeds",
                    "condition_latents", "latents", "output")
"""Tensor fields with one row per item."""


def item_ranges(num_items: int, num_replicas: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal `[start, end)` item ranges, one per replica that gets items."""
    used = min(num_items, num_replicas)
    bounds = [r * num_items // used for r in range(used + 1)]
    return list(zip(bounds, bounds[1:]))


def split_batch(batch: ForwardBatch, start: int, end: int) -> ForwardBatch:
    """Items `[start, end)` of `batch`: prompt lists and per-item tensors sliced, the rest
    shared, and the item's rows of the whole request's noise recorded."""
    size = batch.batch_size
    changes = {}
    for f in dataclasses.fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, list) and f.name in PER_ITEM_LISTS:
            changes[f.name] = value[start:end] if len(value) == size else value
        elif isinstance(value, torch.Tensor) and f.name in PER_ITEM_TENSORS:
            changes[f.name] = value[start:end]
    first, total = batch.extra.get(NOISE_ROWS_KEY, (0, size))
    changes["extra"] = {**batch.extra, NOISE_ROWS_KEY: [first + start, total]}
    changes["timings"] = dict(batch.timings)
    return dataclasses.replace(batch, **changes)


def merge_batches(parts: list[ForwardBatch], original: ForwardBatch) -> ForwardBatch:
    """The replicas' finished batches, in item order, as one: per-item fields concatenated,
    each stage's time the slowest replica's."""
    merged = dataclasses.replace(parts[0])
    for name in PER_ITEM_LISTS:  # the lists `split_batch` sliced
        whole = getattr(original, name)
        if isinstance(whole, list) and len(whole) == original.batch_size:
            setattr(merged, name, [x for p in parts for x in getattr(p, name)])
    for name in PER_ITEM_TENSORS:
        values = [getattr(p, name) for p in parts]
        if all(isinstance(v, torch.Tensor) for v in values):
            setattr(merged, name, torch.cat(values))
    merged.timings = {stage: max(p.timings.get(stage, 0.0) for p in parts)
                      for stage in dict.fromkeys(k for p in parts for k in p.timings)}
    merged.extra = {k: v for k, v in parts[0].extra.items() if k != NOISE_ROWS_KEY}
    if NOISE_ROWS_KEY in original.extra:
        merged.extra[NOISE_ROWS_KEY] = original.extra[NOISE_ROWS_KEY]
    return merged
