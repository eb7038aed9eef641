"""UniPC with the sync-free corrector (`fastvideo.models.schedulers.sync_free`): the same
trajectory as diffusers' bit for bit, and no host-checked solve left in its steps."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from fastvideo.models.schedulers.sync_free import is_sync_free, use_sync_free_steps

CONFIGS = {
    # Wan2.1's (flow matching, x0 prediction, bh2, order 2)
    "wan": dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
    "wan_bh1_order3": dict(prediction_type="flow_prediction", use_flow_sigmas=True,
                           flow_shift=5.0, solver_type="bh1", solver_order=3),
    "epsilon_noise_prediction": dict(prediction_type="epsilon", predict_x0=False,
                                     solver_order=3),
}


def _trajectory(scheduler: UniPCMultistepScheduler, steps: int = 12) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    predictions = [torch.randn(1, 4, 3, 6, 8, generator=generator) for _ in range(steps)]
    scheduler.set_timesteps(steps)
    scheduler.set_begin_index(0)
    sample = torch.randn(1, 4, 3, 6, 8, generator=generator)
    samples = []
    for prediction, t in zip(predictions, scheduler.timesteps):
        sample = scheduler.step(prediction, t, sample, return_dict=False)[0]
        samples.append(sample)
    return samples


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_sync_free_corrector_is_diffusers_bit_for_bit(name: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    reference = _trajectory(UniPCMultistepScheduler(**CONFIGS[name]))
    ours = UniPCMultistepScheduler(**CONFIGS[name])
    assert use_sync_free_steps(ours) and is_sync_free(ours)

    def host_checked_solve(*args, **kwargs):
        raise AssertionError("torch.linalg.solve (a host sync on CUDA) was called")

    # The predictor solves only above order 2; Wan's order-2 steps must solve nowhere.
    if CONFIGS[name].get("solver_order", 2) <= 2:
        monkeypatch.setattr(torch.linalg, "solve", host_checked_solve)
    got = _trajectory(ours)
    # (diffusers' last step of these random trajectories is NaN for some configs: the
    # same NaNs.)
    for step, (a, b) in enumerate(zip(got, reference)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m, step=step: f"step {step}: {m}")
    assert all(s.isfinite().all() for s in reference[:-1]) and reference[-2].abs().max() > 0.1


def test_other_schedulers_are_left_alone() -> None:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    assert not use_sync_free_steps(scheduler)
    assert not is_sync_free(scheduler)


def test_diffusers_own_corrector_solves_on_the_host_every_step(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What the sync-free corrector removes (so the test above can fail)."""
    calls = []
    solve = torch.linalg.solve
    monkeypatch.setattr(torch.linalg, "solve", lambda *a, **k: calls.append(1) or solve(*a, **k))
    _trajectory(UniPCMultistepScheduler(**CONFIGS["wan"]), steps=12)
    assert len(calls) >= 10  # every step from the third on (order 2)


def test_keep_sigmas_on_moves_them_once_and_only_across_devices() -> None:
    from fastvideo.models.schedulers.sync_free import keep_sigmas_on

    scheduler = UniPCMultistepScheduler(**CONFIGS["wan"])
    scheduler.set_timesteps(8)
    sigmas = scheduler.sigmas
    keep_sigmas_on(scheduler, "cpu")
    assert scheduler.sigmas is sigmas  # already there: untouched
    keep_sigmas_on(scheduler, "meta")  # another device (stands in for a GPU here)
    assert scheduler.sigmas.device.type == "meta" and scheduler.sigmas.shape == sigmas.shape
