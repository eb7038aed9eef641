"""The Wan VAE speed-ups (`fastvideo/models/vae_speed.py`) decode what diffusers' VAE does."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLHunyuanVideo, AutoencoderKLWan
from torch._dynamo.utils import counters

from fastvideo.models.vae_speed import CHANNELS_LAST_ATTR, speed_up_vae, vae_input


def _tiny_wan_vae(seed: int = 0) -> AutoencoderKLWan:
    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1,
                            temperal_downsample=[True]).eval()


def _decode(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(vae_input(vae, latents), return_dict=False)[0]


@pytest.mark.parametrize("compile_blocks", [False, True])
def test_sped_up_wan_vae_decodes_as_diffusers_does(compile_blocks: bool) -> None:
    latents = torch.randn(1, 4, 3, 6, 8, generator=torch.Generator().manual_seed(1))
    reference = _decode(_tiny_wan_vae(), latents)
    vae = _tiny_wan_vae()
    compiled = speed_up_vae(vae, channels_last=True, compile_blocks=compile_blocks)
    assert getattr(vae, CHANNELS_LAST_ATTR)
    assert vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert vae_input(vae, latents).is_contiguous(memory_format=torch.channels_last_3d)
    # Every residual block and RMS norm of the decoder, none of the encoder.
    assert compiled == (sum(type(m).__name__ in {"WanResidualBlock", "WanRMS_norm"}
                            for m in vae.decoder.modules()) if compile_blocks else 0)
    assert compiled == 0 or compiled > 4
    graphs = counters["stats"]["unique_graphs"]
    torch.testing.assert_close(_decode(vae, latents), reference, rtol=1e-5, atol=1e-5)
    # Compiled blocks really ran as graphs (not skipped back to eager).
    assert (counters["stats"]["unique_graphs"] > graphs) == compile_blocks


def test_other_vaes_are_left_as_their_library_made_them() -> None:
    vae = AutoencoderKLHunyuanVideo(block_out_channels=(8, 8), down_block_types=(
        "HunyuanVideoDownBlock3D",) * 2, up_block_types=("HunyuanVideoUpBlock3D",) * 2,
        layers_per_block=1, norm_num_groups=4, latent_channels=4)
    assert speed_up_vae(vae, channels_last=True, compile_blocks=True) == 0
    assert not hasattr(vae, CHANNELS_LAST_ATTR)
    latents = torch.randn(1, 4, 2, 3, 3)
    assert vae_input(vae, latents) is latents
