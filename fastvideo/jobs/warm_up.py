"""A fresh warm worker's first calls, made on a dummy request before its first item.

A fresh process pays on its first video for what it does once: the compiled DiT's
tracing and compiled-code loads, the attention kernels' first calls, the text encoder's
and the decoder's first kernels. The command that starts a worker (`flows.cli`) knows the
run's video shape before its first item reaches the worker (Prefect's start comes
between), so it passes that shape along (`--warm-up`, `worker_client.warm_up_hints`), and
the worker can run the model on a dummy request of that shape: every stage once, the DiT once at
the first step of each kind (`DenoisingStage.first_steps_of_each_kind`), the decoder on
two latent frames (every convolution shape a whole video uses). Outputs are dropped; the
items that follow compute exactly what they would have.

It only fills time the worker would spend idle: it starts once the worker answers on its
socket and a moment has passed without a request, runs in pieces, and stops at the next
piece when a request arrives. Measured on an H200, where the worker is ready after the
flow: a whole warm-up ahead of the first item made its video 9.6 s later, since it
computes more (text, two DiT forwards, a decode) than the first item's first calls cost.

`FASTVIDEO_WARM_UP=0` turns it off.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from fastvideo.forward_batch import ForwardBatch
from fastvideo.jobs.engine import ENGINE
from fastvideo.jobs.items import ItemSpec
from fastvideo.pipelines.composed_pipeline_base import ComposedPipelineBase

WARM_UP_ENV = "FASTVIDEO_WARM_UP"
DECODED_LATENT_FRAMES = 2
"""The first latent frame decodes alone, the others by one: two cover every shape."""


def warm_up_enabled() -> bool:
    return os.environ.get(WARM_UP_ENV, "1") != "0"


def warm_up_pipeline(pipeline: ComposedPipelineBase, hints: dict[str, Any],
                     stop: Callable[[], bool] = lambda: False) -> dict[str, Any]:
    """Run every stage of `pipeline` once on a dummy request shaped by `hints` (over the
    family's defaults), one piece at a time (a phase, or one DiT step), asking `stop()`
    before each: a request that arrives meanwhile waits for one piece at most. Returns
    what ran, for the log and `describe` (`stopped_before`: the piece it stopped at)."""
    start = time.perf_counter()
    params = dataclasses.replace(type(pipeline).default_sampling, **hints, negative_prompt="")
    batch = ItemSpec(item_id="warm-up", prompt="a warm-up", shared_negative=False,
                     params=params).to_batch(ForwardBatch())
    args = pipeline.fastvideo_args
    done: dict[str, Any] = {"shape": [params.num_frames, params.height, params.width],
                            "steps": params.num_inference_steps, "dit_steps": []}

    def finish(stopped_before: str | None) -> dict[str, Any]:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        done["stopped_before"] = stopped_before
        done["seconds"] = round(time.perf_counter() - start, 2)
        return done

    after = False
    for phase in pipeline.phases:
        with ENGINE.stage_lock(pipeline, phase.stages), torch.no_grad():
            if phase.denoise:
                stage = pipeline.get_stage(phase.stages[0])
                done["dit_steps"] = stage.warm_up(batch, args, stop)
                left = stage.first_steps_of_each_kind(batch)[len(done["dit_steps"]):]
                if left:
                    return finish(f"{phase.name} step {left[0]}")
                after = True
                continue
            if stop():
                return finish(phase.name)
            if after:  # decoding: a few latent frames of the prepared latents
                batch = dataclasses.replace(
                    batch, latents=batch.latents[:, :, :DECODED_LATENT_FRAMES])
            for name in phase.stages:
                batch = pipeline.get_stage(name)(batch, args)
    return finish(None)
