"""The Wan VAE speed-ups (`fastvideo/models/vae_speed.py`) decode what diffusers' VAE does."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLHunyuanVideo, AutoencoderKLWan
from torch._dynamo.utils import counters

from fastvideo.models.vae_lean_ops import LEAN_OPS_ATTR, use_lean_ops
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
    assert getattr(vae, CHANNELS_LAST_ATTR) and getattr(vae, LEAN_OPS_ATTR)
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


LEAN_CLASSES = {"WanRMS_norm", "WanCausalConv3d", "WanResidualBlock"}


def _lean_modules(vae: AutoencoderKLWan) -> int:
    return sum(type(m).__name__ in LEAN_CLASSES for m in vae.modules())


@pytest.mark.parametrize("channels_last", [False, True])
def test_lean_ops_decode_and_encode_as_diffusers_does(channels_last: bool) -> None:
    """The fused RMS norms (taken where channels are innermost, i.e. channels-last) and the
    convolutions that pad for themselves: the same video and latents to fp32 rounding."""
    latents = torch.randn(1, 4, 3, 6, 8, generator=torch.Generator().manual_seed(2))
    video = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    reference = _tiny_wan_vae()
    vae = _tiny_wan_vae()
    speed_up_vae(vae, channels_last=channels_last, compile_blocks=False, lean_ops=False)
    assert use_lean_ops(vae) == _lean_modules(vae) > 10
    assert all("forward" in vars(m) for m in vae.modules() if type(m).__name__ in LEAN_CLASSES)
    torch.testing.assert_close(_decode(vae, latents), _decode(reference, latents),
                               rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        ours = vae.encode(vae_input(vae, video)).latent_dist.mean
        theirs = reference.encode(video).latent_dist.mean
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("channel_first", "bias", "shape"), [
    (True, False, (2, 8, 3, 4, 5)), (True, True, (2, 8, 3, 4, 5)), (True, False, (6, 8, 4, 5)),
    (False, True, (2, 3, 4, 8))])
def test_lean_rms_norm_matches_diffusers(channel_first: bool, bias: bool,
                                         shape: tuple[int, ...]) -> None:
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

    torch.manual_seed(4)
    norm = WanRMS_norm(8, channel_first=channel_first, images=len(shape) == 4, bias=bias)
    with torch.no_grad():
        norm.gamma.uniform_(0.5, 1.5)
        if bias:
            norm.bias.uniform_(-1, 1)
    x = torch.randn(shape)
    layout = {5: torch.channels_last_3d, 4: torch.channels_last}[len(shape)]
    x_innermost = x.contiguous(memory_format=layout) if channel_first else x
    x_innermost[0, ..., :1] = 0  # rows of zeros: 0 out (+ bias) as F.normalize gives, no NaN
    with torch.no_grad():
        expected = norm(x_innermost)
        use_lean_ops(norm)
        got = norm(x_innermost)
        # Channels not innermost: diffusers' own forward, bit for bit.
        strided = norm(x_innermost.contiguous()) if channel_first else None
    assert not got.isnan().any()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    if strided is not None:
        torch.testing.assert_close(strided, expected, rtol=0, atol=0)


def test_lean_residual_blocks_give_their_convolutions_the_concatenated_input() -> None:
    """Writing the SiLU after the cached frames is the concatenation diffusers does: the
    decode and the encode are the same with or without it, chunk after chunk (first,
    one-frame and steady chunks), to a unit in the last place of fp32 (the CPU's SiLU
    into a buffer slice and into a new tensor may round differently)."""
    import types

    from fastvideo.models import vae_lean_ops

    latents = torch.randn(1, 4, 4, 6, 8, generator=torch.Generator().manual_seed(5))
    video = torch.rand(1, 3, 9, 16, 16, generator=torch.Generator().manual_seed(6)) * 2 - 1
    outputs = []
    for blocks in (True, False):
        vae = _tiny_wan_vae()
        speed_up_vae(vae, channels_last=True, compile_blocks=False, lean_ops=blocks)
        if not blocks:  # the norms and convolutions only
            for m in vae.modules():
                if type(m).__name__ == "WanRMS_norm":
                    m.forward = types.MethodType(vae_lean_ops._rms_norm_forward, m)
                elif type(m).__name__ == "WanCausalConv3d":
                    m.forward = types.MethodType(vae_lean_ops._causal_conv_forward, m)
        else:
            assert sum("forward" in vars(m) for m in vae.modules()
                       if type(m).__name__ == "WanResidualBlock") >= 4
        with torch.no_grad():
            outputs.append((_decode(vae, latents),
                            vae.encode(vae_input(vae, video)).latent_dist.mean))
    for ours, concatenated in zip(*outputs):
        torch.testing.assert_close(ours, concatenated, rtol=0, atol=2e-6)
        assert ours.abs().max() > 0.1


def test_lean_ops_leave_modules_they_do_not_know_alone() -> None:
    vae = _tiny_wan_vae()
    odd_conv = vae.decoder.conv_in
    odd_conv._padding = (1, 0, 1, 1, 2, 0)  # asymmetric: not what the lean conv handles
    odd_norm = vae.decoder.norm_out
    odd_norm.scale = torch.tensor(2.0)  # not the float diffusers sets
    odd_block = vae.decoder.mid_block.resnets[0]
    odd_block.nonlinearity = torch.nn.GELU()  # not the SiLU it writes into the buffer
    assert use_lean_ops(vae) == _lean_modules(vae) - 3
    assert all("forward" not in vars(m) for m in (odd_conv, odd_norm, odd_block))
    # In training (dropout), a block runs diffusers' own forward.
    block = vae.decoder.mid_block.resnets[1]
    assert "forward" in vars(block)
    block.train()
    x = torch.randn(1, block.in_dim, 2, 4, 4)
    cache_a, cache_b = [None] * 4, [None] * 4
    with torch.no_grad():
        torch.testing.assert_close(block(x, cache_a, [0]), type(block).forward(block, x, cache_b,
                                                                               [0]), rtol=0, atol=0)
