"""Decode pacing (`fastvideo/models/decode_pacing.py`): which calls wait for which, per
thread, and a paced Wan VAE (diffusers' own class) decodes exactly what an unpaced one does.
The waits are on CUDA events in the engine; here an event that records its own order stands
in for them, since CI has no GPU."""

from __future__ import annotations

import threading

import pytest
import torch
from diffusers import AutoencoderKLWan

from fastvideo.models.decode_pacing import PACED_ATTR, InFlightLimit, pace_decoder


class _Event:
    """Numbered at creation; says when it was recorded and waited for."""

    def __init__(self, log: list[str]) -> None:
        self.log, self.number = log, sum(e.startswith("record") for e in log) + 1

    def record(self) -> None:
        self.log.append(f"record {self.number}")

    def synchronize(self) -> None:
        self.log.append(f"wait {self.number}")


def test_each_call_waits_for_the_one_max_in_flight_back() -> None:
    log: list[str] = []
    limit = InFlightLimit(2, make_event=lambda: _Event(log))
    for _ in range(5):
        limit.after_call()
    assert log == ["record 1", "record 2", "record 3", "wait 1", "record 4", "wait 2",
                   "record 5", "wait 3"]
    with pytest.raises(ValueError, match="max_in_flight must be >= 1, got 0"):
        InFlightLimit(0)


def test_threads_are_paced_apart() -> None:
    logs: dict[str, list[str]] = {"a": [], "b": []}
    current = threading.local()
    limit = InFlightLimit(1, make_event=lambda: _Event(logs[current.name]))

    def calls(name: str, count: int) -> None:
        current.name = name
        for _ in range(count):
            limit.after_call()

    calls("a", 2)  # leaves one event pending in this thread
    worker = threading.Thread(target=calls, args=("b", 1))
    worker.start()
    worker.join()
    # Thread b's first call waits for nothing of thread a's.
    assert logs["b"] == ["record 1"]
    assert logs["a"] == ["record 1", "record 2", "wait 1"]


def _tiny_wan_vae() -> AutoencoderKLWan:
    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1,
                            temperal_downsample=[True]).eval()


def test_paced_wan_vae_decodes_the_same_and_waits_per_latent_frame() -> None:
    latents = torch.randn(1, 4, 3, 6, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = _tiny_wan_vae().decode(latents, return_dict=False)[0]
    vae, log = _tiny_wan_vae(), []
    limit = InFlightLimit(2, make_event=lambda: _Event(log))
    assert pace_decoder(vae, limit=limit, device_type="cpu")
    assert pace_decoder(vae, limit=InFlightLimit(1), device_type="cpu")  # once only
    assert getattr(vae, PACED_ATTR) is limit
    with torch.no_grad():
        out = vae.decode(latents, return_dict=False)[0]
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    # diffusers decodes Wan latents one frame at a time: 3 decoder calls, the third waits.
    assert log == ["record 1", "record 2", "record 3", "wait 1"]
    # The engine's default paces CUDA outputs only: a CPU decode records nothing.
    cpu_vae = _tiny_wan_vae()
    assert pace_decoder(cpu_vae)
    with torch.no_grad():
        torch.testing.assert_close(cpu_vae.decode(latents, return_dict=False)[0], reference,
                                   rtol=0, atol=0)


def test_a_vae_without_a_decoder_module_is_left_alone() -> None:
    assert not pace_decoder(torch.nn.Linear(2, 2))


def test_pacing_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    from fastvideo.models.decode_pacing import PACING_ENV, pacing_enabled

    monkeypatch.delenv(PACING_ENV, raising=False)
    assert pacing_enabled()
    monkeypatch.setenv(PACING_ENV, "0")
    assert not pacing_enabled()
    monkeypatch.setenv(PACING_ENV, "off")
    with pytest.raises(ValueError, match="FASTVIDEO_DECODE_PACING='off'; allowed: 1"):
        pacing_enabled()
