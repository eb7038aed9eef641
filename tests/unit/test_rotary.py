"""`apply_rotary_emb` against the complex-number rotation it stands for."""

from __future__ import annotations

import torch

from fastvideo.layers.rotary_embedding import RotaryEmbedding3D, apply_rotary_emb


def test_rotation_equals_complex_product() -> None:
    torch.manual_seed(0)
    grid, head_dim = (2, 3, 4), 16
    freqs = RotaryEmbedding3D((4, 6, 6), max_seq_len=8)(grid, torch.device("cpu"))
    x = torch.randn(2, 24, 3, head_dim)
    rotation = torch.polar(torch.ones_like(freqs[..., 0]), torch.atan2(freqs[..., 1], freqs[..., 0]))
    expected = torch.view_as_real(
        torch.view_as_complex(x.unflatten(-1, (-1, 2))) * rotation[:, None]).flatten(-2)
    torch.testing.assert_close(apply_rotary_emb(x, freqs), expected, rtol=0, atol=1e-6)
    # Half inputs: fp32 math, one rounding at the end, the input's dtype out.
    out = apply_rotary_emb(x.bfloat16(), freqs)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, apply_rotary_emb(x.bfloat16().float(), freqs).bfloat16(),
                               rtol=0, atol=0)
