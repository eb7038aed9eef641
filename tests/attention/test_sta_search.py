"""The STA window search on a tiny random Wan DiT (CPU, fp32) and on the tiny checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fastvideo.attention.sta_config import STAConfig
from fastvideo.entrypoints import sta_search
from fastvideo.entrypoints.sta_search import main, search_windows
from fastvideo.models.dits.wanvideo import WanTransformer3DModel

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

TINY_DIT = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64,
                num_layers=2, rope_max_seq_len=32)
TILE = (1, 2, 2)  # latent (3, 6, 10) -> token grid (3, 3, 5) -> tiles (3, 2, 3), padded
CANDIDATES = [(3, 2, 3), (1, 2, 1), (1, 1, 1)]  # the whole grid, then smaller windows


@pytest.fixture(scope="module")
def dit() -> WanTransformer3DModel:
    model = WanTransformer3DModel(**TINY_DIT).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model


def _calibration_run(dit: WanTransformer3DModel):
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 3, 6, 10, generator=generator)
    text = torch.randn(1, 7, 32, generator=generator)
    outputs = []

    def run() -> None:
        # Steps 0 and 1; step 1 twice, as classifier-free guidance calls the DiT.
        for t in (900.0, 500.0, 500.0):
            outputs.append(dit(latents, text, torch.tensor([t])))

    return run, outputs


def test_threshold_zero_keeps_every_head_dense(dit: WanTransformer3DModel) -> None:
    run, _ = _calibration_run(dit)
    config = search_windows(dit, run, candidates=CANDIDATES, threshold=0.0, tile_size=TILE)
    assert config.tile_size == TILE and config.num_full_steps == 0
    assert config.windows == {0: ((None, None),) * 2, 1: ((None, None),) * 2}


def test_huge_threshold_picks_the_smallest_window(dit: WanTransformer3DModel) -> None:
    run, _ = _calibration_run(dit)
    config = search_windows(dit, run, candidates=CANDIDATES, threshold=1e9, tile_size=TILE,
                            num_full_steps=1)
    assert config.num_full_steps == 1
    assert config.windows == {1: (((1, 1, 1), (1, 1, 1)),) * 2}  # step 0 runs dense anyway


def test_search_leaves_the_model_as_it_was(dit: WanTransformer3DModel) -> None:
    run, outputs = _calibration_run(dit)
    run()
    search_windows(dit, run, candidates=CANDIDATES, threshold=0.5, tile_size=TILE)
    run()
    # The search returns the dense outputs and removes its hooks: same numbers every time.
    for i in range(3):
        torch.testing.assert_close(outputs[3 + i], outputs[i], atol=0, rtol=0)
        torch.testing.assert_close(outputs[6 + i], outputs[i], atol=0, rtol=0)
    assert all("get_impl" not in m.__dict__ for m in dit.modules())
    assert not dit._forward_pre_hooks


def test_bad_arguments(dit: WanTransformer3DModel, monkeypatch: pytest.MonkeyPatch) -> None:
    run, _ = _calibration_run(dit)
    with pytest.raises(ValueError, match="candidates is empty"):
        search_windows(dit, run, candidates=[], threshold=0.1)
    with pytest.raises(ValueError, match="candidate must be three positive ints"):
        search_windows(dit, run, candidates=[(0, 1, 1)], threshold=0.1)
    with pytest.raises(ValueError, match="never called the DiT"):
        search_windows(dit, lambda: None, candidates=CANDIDATES, threshold=0.1)
    monkeypatch.setattr(sta_search, "get_sp_world_size", lambda: 2)
    with pytest.raises(ValueError, match="in one process"):
        search_windows(dit, run, candidates=CANDIDATES, threshold=0.1)


def test_command_line_on_the_tiny_checkpoint(tiny_wan_path: Path, tmp_path: Path) -> None:
    output = tmp_path / "sta.json"
    main(["--model-path", str(tiny_wan_path), "--prompt", "a cat walks across a sunny garden",
          "--output", str(output), "--candidates", "1,1,1", "3,1,1", "--threshold", "1e9",
          "--tile-size", "1,2,2", "--num-full-steps", "1", "--device", "cpu",
          "--height", "16", "--width", "16", "--num-frames", "5",
          "--num-inference-steps", "3", "--guidance-scale", "3"])
    config = STAConfig.load(output)
    assert config.num_full_steps == 1 and config.tile_size == (1, 2, 2)
    assert sorted(config.windows) == [1, 2]
    assert json.loads(output.read_text())["windows"]["1"] == [[[1, 1, 1]] * 2] * 2
