"""Scheduler steps that never make the host wait for the GPU.

A denoising loop only keeps the GPU busy across its steps if the host can queue step
k+1's forward while step k still runs. Anything in a step that reads a device value on
the host (or copies pageable memory to the device, which PyTorch does with a stream sync)
drains the queue, and the next step then starts on an idle GPU while the host launches
its first kernels one by one. diffusers' UniPC step did both: it copies its CPU noise
levels to the device (the denoising stage now keeps them there: `keep_sigmas_on`), and
its corrector solves a small linear system with `torch.linalg.solve`, which checks for a
singular matrix on the host, a sync every step.

`use_sync_free_steps` gives a UniPC scheduler a corrector that computes the same thing
with the same operations but solves with `torch.linalg.solve_ex` (the same kernels,
without the check: the system is a Vandermonde matrix of distinct step ratios, never
singular), so its steps queue like the rest of the loop. The result is the same, bit for
bit (tests).
"""

from __future__ import annotations

import contextlib
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch


def use_sync_free_steps(scheduler: Any) -> bool:
    """Give diffusers' `UniPCMultistepScheduler` the sync-free corrector; returns whether
    `scheduler` was changed (other schedulers' steps do not sync with their noise levels
    on the device, and are left as they are)."""
    if type(scheduler).__name__ != "UniPCMultistepScheduler" or not all(
            hasattr(scheduler, name) for name in ("multistep_uni_c_bh_update", "model_outputs",
                                                  "_sigma_to_alpha_sigma_t", "predict_x0")):
        return False
    # No marker attribute: a scheduler's scalar attributes are its checkpointed state
    # (`fastvideo.models.schedulers.state`); `is_sync_free` looks at the method instead.
    scheduler.multistep_uni_c_bh_update = types.MethodType(_corrector, scheduler)
    return True


def keep_sigmas_on(scheduler: Any, device: str | torch.device) -> None:
    """Move the scheduler's noise levels to `device` (after each `set_timesteps`, which puts
    them back on the CPU): a UniPC step reads a few every step, and each copy of CPU memory
    to the GPU waits for the GPU's queue to drain."""
    sigmas = getattr(scheduler, "sigmas", None)
    if isinstance(sigmas, torch.Tensor):
        scheduler.sigmas = sigmas.to(device)  # the same tensor when already there


@contextlib.contextmanager
def count_host_syncs() -> Iterator[Callable[[], int]]:
    """Within the block, CUDA operations that make the host wait for the GPU are counted
    (`torch.cuda.set_sync_debug_mode`); yields a function giving the count so far."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield lambda: sum("synchroniz" in str(w.message) for w in caught)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def is_sync_free(scheduler: Any) -> bool:
    """Whether `use_sync_free_steps` changed `scheduler`."""
    method = vars(scheduler).get("multistep_uni_c_bh_update")
    return getattr(method, "__func__", None) is _corrector


def _corrector(self: Any, this_model_output: torch.Tensor, *args: Any,
               last_sample: torch.Tensor | None = None, this_sample: torch.Tensor | None = None,
               order: int | None = None, **kwargs: Any) -> torch.Tensor:
    """UniC-p (diffusers' `multistep_uni_c_bh_update`, as `step` calls it: by keyword), the
    linear system solved without a host-side check. Older positional calls go to
    diffusers' own method."""
    if args or kwargs or last_sample is None or this_sample is None or order is None:
        return type(self).multistep_uni_c_bh_update(
            self, this_model_output, *args, last_sample=last_sample, this_sample=this_sample,
            order=order, **kwargs)
    outputs = self.model_outputs
    m0 = outputs[-1]
    x = last_sample
    device = this_sample.device
    step = self.step_index

    def alpha_sigma_lambda(index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        alpha, sigma = self._sigma_to_alpha_sigma_t(self.sigmas[index].to(device))
        return alpha, sigma, torch.log(alpha) - torch.log(sigma)

    alpha_t, sigma_t, lambda_t = alpha_sigma_lambda(step)
    alpha_s0, sigma_s0, lambda_s0 = alpha_sigma_lambda(step - 1)
    h = lambda_t - lambda_s0
    # The earlier steps' ratios r_k and the differences of their outputs to this one.
    ratios, differences = [], []
    for i in range(1, order):
        lambda_si = alpha_sigma_lambda(step - (i + 1))[2]
        ratio = (lambda_si - lambda_s0) / h
        ratios.append(ratio)
        differences.append((outputs[-(i + 1)] - m0) / ratio)
    ratios.append(torch.ones((), device=device))
    r = torch.stack(ratios)

    hh = -h if self.predict_x0 else h
    h_phi_1 = torch.expm1(hh)  # h * phi_1(h) = e^h - 1
    h_phi_k = h_phi_1 / hh - 1
    if self.config.solver_type == "bh1":
        b_h = hh
    elif self.config.solver_type == "bh2":
        b_h = torch.expm1(hh)
    else:
        raise NotImplementedError(f"UniPC solver_type {self.config.solver_type!r}; "
                                  "known: bh1, bh2")
    rows, rhs = [], []
    factorial = 1
    for i in range(1, order + 1):
        rows.append(torch.pow(r, i - 1))
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial

    if order == 1:
        rhos = torch.ones(1, dtype=x.dtype, device=device) * 0.5
    else:
        rhos = torch.linalg.solve_ex(torch.stack(rows), torch.stack(rhs))[0]
        rhos = rhos.to(device).to(x.dtype)
    corr_res: torch.Tensor | int = 0
    if differences:
        corr_res = torch.einsum("k,bkc...->bc...", rhos[:-1], torch.stack(differences, dim=1))
    d1_t = this_model_output - m0
    if self.predict_x0:
        x_t_ = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
        x_t = x_t_ - alpha_t * b_h * (corr_res + rhos[-1] * d1_t)
    else:
        x_t_ = alpha_t / alpha_s0 * x - sigma_t * h_phi_1 * m0
        x_t = x_t_ - sigma_t * b_h * (corr_res + rhos[-1] * d1_t)
    return x_t.to(x.dtype)
