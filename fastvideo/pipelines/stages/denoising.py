"""DenoisingStage: the diffusion loop, with classifier-free guidance and resumable state."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fastvideo.attention.metadata import AttentionMetadata
from fastvideo.attention.sta_config import STAConfig
from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.forward_batch import ForwardBatch
from fastvideo.models.dits.step_cache import StepCache, check_supported
from fastvideo.models.schedulers.state import get_scheduler_state, load_scheduler_state
from fastvideo.models.schedulers.sync_free import keep_sigmas_on
from fastvideo.pipelines.stages.base import PipelineStage
from fastvideo.pipelines.stages.timestep_preparation import SigmaSchedule, set_timesteps

logger = logging.getLogger(__name__)

SCHEDULER_STATE_KEY = "scheduler_state"
StepCallback = Callable[[ForwardBatch, int, int], None]
DiTContext = dict[str, torch.Tensor]
"""The DiT's keyword arguments besides the latents and timestep (text, image context)."""
DiTInputs = Callable[[ForwardBatch, bool, str, torch.dtype], DiTContext]
"""A family's DiT context for one guidance branch: `(batch, negative, device, dtype)`."""


def text_image_context(batch: ForwardBatch, negative: bool, device: str,
                       dtype: torch.dtype) -> DiTContext:
    """Wan's DiT context: the (negative) prompt's embeddings, and the image's CLIP tokens
    (image-to-video) in both branches."""
    embeds = batch.negative_prompt_embeds if negative else batch.prompt_embeds
    context: DiTContext = {"encoder_hidden_states": embeds.to(device, dtype)}
    if batch.image_embeds is not None:
        context["encoder_hidden_states_image"] = batch.image_embeds.to(device, dtype)
    return context


def guided_step_count(guidance_end: float, total: int) -> int:
    """How many of the first steps classifier-free guidance runs: `ceil(guidance_end x
    total)`, the product rounded to 9 decimals first (0.14 x 50 gives 7, not 8)."""
    return min(total, math.ceil(round(guidance_end * total, 9)))


@dataclass(frozen=True)
class _Loop:
    """A denoising loop's inputs, on the device, prepared once per call."""

    timesteps: torch.Tensor
    latents: torch.Tensor
    condition: torch.Tensor | None
    cond: DiTContext
    """The conditional branch's context as given (what a step cache compares)."""
    dit_cond: DiTContext | None
    dit_uncond: DiTContext | None
    dit_paired: DiTContext | None
    guided_steps: int
    dtype: torch.dtype


class DenoisingStage(PipelineStage):
    """Runs the DiT over the remaining timesteps, starting at `batch.step_index`.

    The scheduler is re-initialised from the batch on every call (it may run in a
    different process from the stage that chose the timesteps), and when
    `batch.extra["scheduler_state"]` is present (a resumed run) its multistep history is
    restored, so a resumed loop ends with the same latents as an uninterrupted one.
    `on_step_end(batch, step, total)` is called after every step with the scheduler
    state stored in the batch; a caller uses it to checkpoint or report progress.

    With `batch_cfg` the conditional and unconditional inputs of classifier-free guidance
    go through the DiT as one batch (conditional first), when their text embeddings have
    the same shape; otherwise, or without it, as two forwards.

    `batch.guidance_end` < 1 guides only the first fraction of the steps (the rest run the
    conditional branch alone). `fastvideo_args.step_cache_threshold` skips the DiT's blocks
    on steps whose input changed little (`fastvideo.models.dits.step_cache`).

    Image-to-video batches carry more DiT inputs, used by both guidance branches:
    `condition_latents` follow the noisy latents on channels, and `image_embeds` are the
    DiT's `encoder_hidden_states_image`.

    What else a DiT takes (HunyuanVideo: a text mask, pooled text, embedded guidance) comes
    from the family's `dit_inputs`; `sigmas` is the family's noise schedule, if it has one.
    """

    reads = ("prompt_embeds", "latents", "timesteps")
    writes = ("latents",)

    def __init__(self, transformer: Any, scheduler: Any,
                 on_step_end: StepCallback | None = None,
                 sta_config: STAConfig | None = None, batch_cfg: bool = True,
                 dit_inputs: DiTInputs = text_image_context,
                 sigmas: SigmaSchedule | None = None) -> None:
        self.transformer = transformer
        self.scheduler = scheduler
        self.on_step_end = on_step_end
        self.sta_config = sta_config
        """Sliding tile attention windows per step; used only by layers running that backend."""
        self.batch_cfg = batch_cfg
        self.dit_inputs = dit_inputs
        self.sigmas = sigmas

    def _prepare_scheduler(self, batch: ForwardBatch, device: str) -> None:
        set_timesteps(self.scheduler, batch.num_inference_steps, device, self.sigmas)
        expected = batch.timesteps.to(self.scheduler.timesteps.device)
        if not torch.equal(self.scheduler.timesteps, expected):
            raise ValueError(
                "the scheduler's timesteps differ from ForwardBatch.timesteps; "
                "was the batch prepared with a different scheduler or step count?")
        self.scheduler.set_begin_index(0)
        state = batch.extra.get(SCHEDULER_STATE_KEY)
        if batch.step_index > 0:
            if state is None:
                raise ValueError(
                    f"batch resumes at step {batch.step_index} but has no "
                    f"extra[{SCHEDULER_STATE_KEY!r}] to restore the scheduler from")
            load_scheduler_state(self.scheduler, state, device)
        # diffusers keeps the noise levels on the CPU, and each UniPC step copied a few to
        # the GPU, each copy a wait for the GPU's queue: every step began on an idle GPU.
        keep_sigmas_on(self.scheduler, device)

    def _predict_noise(self, latents: torch.Tensor, t: torch.Tensor, cond: DiTContext,
                       uncond: DiTContext | None, paired: DiTContext | None,
                       guidance_scale: float, step: int,
                       cache: StepCache | None = None) -> torch.Tensor:
        """The DiT's prediction at `t` (step index `step`) given the context keyword
        arguments of each branch, guided when `uncond` is given; `paired` runs both branches
        as one batch. With a step `cache`, each branch passes its own residual cache."""
        size = latents.shape[0]
        # Only with STA configured: a DiT without the keyword (diffusers') runs dense.
        extra: dict[str, Any] = ({} if self.sta_config is None else {
            "attn_metadata": AttentionMetadata(sta_config=self.sta_config, step=step)})

        def branch(name: str) -> dict[str, Any]:
            return {**extra, "step_cache": cache.branch(name)} if cache is not None else extra

        if paired is not None:
            noise = self.transformer(hidden_states=torch.cat([latents, latents]),
                                     timestep=t.expand(2 * size), **paired, **branch("paired"))
            noise_cond, noise_uncond = noise[:size], noise[size:]
        else:
            timestep = t.expand(size)
            noise_cond = self.transformer(hidden_states=latents, timestep=timestep, **cond,
                                          **branch("cond"))
            if uncond is None:
                return noise_cond
            noise_uncond = self.transformer(hidden_states=latents, timestep=timestep, **uncond,
                                            **branch("uncond"))
        return noise_uncond + guidance_scale * (noise_cond - noise_uncond)

    def _prepare_contexts(self, cond: DiTContext, uncond: DiTContext | None,
                          paired: DiTContext | None, guided: bool, unguided: bool
                          ) -> tuple[DiTContext, DiTContext | None, DiTContext | None]:
        """The branches' context keywords with what the DiT computes from the context alone
        done once for the loop (`prepare_context`, where the DiT has one), for the branches
        the remaining steps run: paired (or cond and uncond) while guided, cond after."""
        prepare = getattr(self.transformer, "prepare_context", None)
        if prepare is None:
            return cond, uncond, paired

        def ready(context: DiTContext | None, used: bool) -> DiTContext | None:
            return prepare(**context) if context is not None and used else context

        return (ready(cond, unguided or (guided and paired is None)),
                ready(uncond, guided and paired is None), ready(paired, guided))

    def _step_cache(self, fastvideo_args: FastVideoArgs) -> StepCache | None:
        threshold = fastvideo_args.step_cache_threshold
        if threshold is None:
            return None
        check_supported(type(self.transformer), threshold)
        return StepCache(threshold)

    def _loop(self, batch: ForwardBatch, fastvideo_args: FastVideoArgs) -> _Loop:
        """What every step of the loop over `batch` reads, prepared once."""
        if batch.do_classifier_free_guidance and batch.negative_prompt_embeds is None:
            raise ValueError(
                f"guidance_scale={batch.guidance_scale} > 1 needs negative_prompt_embeds")
        device = fastvideo_args.device
        dtype = fastvideo_args.torch_dtype
        self._prepare_scheduler(batch, device)
        timesteps = batch.timesteps.to(device)
        cond = self.dit_inputs(batch, False, device, dtype)
        uncond = (self.dit_inputs(batch, True, device, dtype)
                  if batch.do_classifier_free_guidance else None)
        # Both branches' context as one batch, built once for the whole loop.
        paired = ({key: torch.cat([cond[key], uncond[key]]) for key in cond}
                  if self.batch_cfg and uncond is not None
                  and all(cond[key].shape == uncond[key].shape for key in cond) else None)
        condition = (batch.condition_latents.to(device, dtype)
                     if batch.condition_latents is not None else None)
        total = len(timesteps)
        guided_steps = guided_step_count(batch.guidance_end, total) if uncond is not None else 0
        dit_cond, dit_uncond, dit_paired = self._prepare_contexts(
            cond, uncond, paired, guided=guided_steps > batch.step_index,
            unguided=total > max(guided_steps, batch.step_index))
        return _Loop(timesteps, batch.latents.to(device), condition, cond, dit_cond,
                     dit_uncond, dit_paired, guided_steps, dtype)

    def _model_input(self, loop: _Loop, latents: torch.Tensor) -> torch.Tensor:
        model_input = latents.to(loop.dtype)
        if loop.condition is not None:
            model_input = torch.cat([model_input, loop.condition], dim=1)
        return model_input

    def _step_prediction(self, loop: _Loop, model_input: torch.Tensor, i: int,
                         guidance_scale: float, cache: StepCache | None = None
                         ) -> torch.Tensor:
        guided = i < loop.guided_steps
        return self._predict_noise(model_input, loop.timesteps[i], loop.dit_cond,
                                   loop.dit_uncond if guided else None,
                                   loop.dit_paired if guided else None,
                                   guidance_scale, i, cache)

    def first_steps_of_each_kind(self, batch: ForwardBatch) -> list[int]:
        """The steps where the loop over `batch` first calls the DiT in a new way: its
        first step, the first without guidance, the first with sparse attention."""
        total = batch.num_inference_steps
        guided = (guided_step_count(batch.guidance_end, total)
                  if batch.do_classifier_free_guidance else 0)
        firsts = {0, guided}
        if self.sta_config is not None:
            firsts.add(self.sta_config.num_full_steps)
        return sorted(step for step in firsts if step < total)

    def warm_up(self, batch: ForwardBatch, fastvideo_args: FastVideoArgs,
                stop: Callable[[], bool] = lambda: False) -> list[int]:
        """One DiT prediction at each of `first_steps_of_each_kind(batch)`, outputs dropped
        and `batch` unchanged, asking `stop()` before each: a fresh process's compiles and
        first kernel loads, made before its first item. Returns the steps run."""
        loop = self._loop(batch, fastvideo_args)
        model_input = self._model_input(loop, loop.latents)
        done: list[int] = []
        with torch.no_grad():
            for i in self.first_steps_of_each_kind(batch):
                if stop():
                    break
                self._step_prediction(loop, model_input, i, batch.guidance_scale)
                done.append(i)
        return done

    def forward(self, batch: ForwardBatch, fastvideo_args: FastVideoArgs) -> ForwardBatch:
        loop = self._loop(batch, fastvideo_args)
        latents, total = loop.latents, len(loop.timesteps)
        cache = self._step_cache(fastvideo_args)
        for i in range(batch.step_index, total):
            model_input = self._model_input(loop, latents)
            if cache is not None:
                cache.decide(i, total, self.transformer.step_cache_input(
                    model_input, loop.timesteps[i].expand(model_input.shape[0]), **loop.cond))
            noise_pred = self._step_prediction(loop, model_input, i, batch.guidance_scale,
                                               cache)
            t = loop.timesteps[i]
            latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            batch.latents = latents
            batch.step_index = i + 1
            if self.on_step_end is not None:
                batch.extra[SCHEDULER_STATE_KEY] = get_scheduler_state(self.scheduler)
                self.on_step_end(batch, i + 1, total)
        batch.extra.pop(SCHEDULER_STATE_KEY, None)
        if cache is not None:
            logger.info("step cache (threshold %g): blocks ran %d times, reused %d times",
                        cache.threshold, cache.computed, cache.skipped)
        return batch
