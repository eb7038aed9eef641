"""HunyuanVideo DiT, the same math as diffusers' `HunyuanVideoTransformer3DModel` (T2V).

It loads diffusers' safetensors unchanged (`param_names_mapping` renames the few modules
named differently here). Text goes through a token refiner, then 20 dual-stream blocks
(video and text with their own weights, one joint attention) and 40 single-stream blocks
(shared weights), all attending video tokens (3D RoPE) followed by the text tokens.

Under sequence parallelism the video tokens are sharded over the sp ranks and the text is
replicated: each rank computes the text's per-token math itself, and the joint attention
(`DistributedAttention.forward_joint`) appends each rank's heads of the text after the
gathered video tokens, so the text needs no all-to-all.

Text padding: the text is cut to the longest prompt of the batch, and each item attends
only its own prompt's tokens (`encoder_attention_mask`, a prefix mask); the outputs at
padding positions are never read, as in diffusers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from fastvideo.attention import DistributedAttention, LocalAttention, _Backend
from fastvideo.attention.layer import AppendedTokens
from fastvideo.attention.metadata import AttentionMetadata
from fastvideo.layers.activation import get_act_fn, linear_gelu_tanh
from fastvideo.layers.embeddings import MLPEmbedder, timestep_embedding
from fastvideo.layers.layernorm import LayerNormScaleShift, RMSNorm
from fastvideo.layers.linear import ReplicatedLinear
from fastvideo.layers.mlp import FeedForward
from fastvideo.layers.rotary_embedding import RotaryEmbedding3D, apply_rotary_emb
from fastvideo.models.config_fields import strict_fields
from fastvideo.models.dits.sequence_shard import (
    gather_tokens,
    shard_tokens,
    token_grid,
    with_fresh_strides,
)
from fastvideo.models.dits.step_cache import BranchCache
from fastvideo.models.loader.weight_utils import load_renamed_weights

_JOINT_ATTN_BACKENDS = (_Backend.TORCH_SDPA, _Backend.FLASH_ATTN, _Backend.SLIDING_TILE_ATTN)
_REFINER_ATTN_BACKENDS = (_Backend.TORCH_SDPA, _Backend.FLASH_ATTN)
_TIME_FREQ_DIM = 256
"""Width of the sinusoidal timestep and guidance embeddings (fixed in diffusers)."""
_REFINER_MLP_RATIO = 4.0
"""diffusers builds the token refiner with its default ratio, whatever `mlp_ratio` says."""
_ROPE_MAX_POSITIONS = 1 << 16
"""diffusers sets no limit on the token grid; this is far beyond any latent's."""


@dataclass(frozen=True, kw_only=True)
class HunyuanVideoTransformerConfig:
    """The keys of diffusers' `HunyuanVideoTransformer3DModel` `config.json`, with its
    defaults (those of the released T2V model)."""

    in_channels: int = 16
    out_channels: int | None = 16
    """None: same as `in_channels`."""
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    num_layers: int = 20
    """Dual-stream blocks."""
    num_single_layers: int = 40
    """Single-stream blocks."""
    num_refiner_layers: int = 2
    """Self-attention blocks of the token refiner (text only)."""
    mlp_ratio: float = 4.0
    patch_size: int = 2
    """Spatial patch size (height and width)."""
    patch_size_t: int = 1
    qk_norm: str = "rms_norm"
    """Per-head RMSNorm of q and k; the only value the model supports."""
    guidance_embeds: bool = True
    """Embedded guidance (guidance-distilled model): `forward` then requires `guidance`."""
    text_embed_dim: int = 4096
    """Width of the text encoder's (Llama) hidden states."""
    pooled_projection_dim: int = 768
    """Width of the pooled (CLIP) text embedding."""
    rope_theta: float = 256.0
    rope_axes_dim: tuple[int, int, int] = (16, 56, 56)
    """Head dimensions rotated by the (frame, height, width) position; sum to the head dim."""
    image_condition_type: str | None = None
    """I2V variants ("latent_concat", "token_replace"); not supported here."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "rope_axes_dim", tuple(self.rope_axes_dim))
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)
        if self.qk_norm != "rms_norm":
            raise ValueError(f"qk_norm={self.qk_norm!r} is not supported; only 'rms_norm'")
        if self.image_condition_type is not None:
            raise ValueError(f"image_condition_type={self.image_condition_type!r} (I2V) is not "
                             "supported; only None (T2V)")
        if len(self.rope_axes_dim) != 3 or sum(self.rope_axes_dim) != self.attention_head_dim:
            raise ValueError(f"rope_axes_dim {self.rope_axes_dim} must be 3 values summing to "
                             f"attention_head_dim={self.attention_head_dim}")

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def patch(self) -> tuple[int, int, int]:
        return self.patch_size_t, self.patch_size, self.patch_size

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> HunyuanVideoTransformerConfig:
        """From a `config.json` dict; keys starting with `_` (diffusers metadata) are dropped."""
        return cls(**strict_fields(cls, config, "HunyuanVideoTransformer3DModel"))


def text_lengths(mask: torch.Tensor, num_tokens: int) -> list[int]:
    """Valid tokens per prompt of a `[B, L]` prefix mask (1 = real token). ValueError on a
    mask of another shape, an empty prompt, or real tokens after padding."""
    if mask.ndim != 2 or mask.shape[1] != num_tokens:
        raise ValueError(f"encoder_attention_mask must be [B, {num_tokens}], got "
                         f"{tuple(mask.shape)}")
    mask = mask.bool()
    lengths = mask.sum(dim=1)
    prefix = torch.arange(num_tokens, device=mask.device) < lengths[:, None]
    if not torch.equal(mask, prefix) or not bool((lengths > 0).all()):
        raise ValueError("encoder_attention_mask must mark a non-empty prefix of each prompt "
                         f"(padding last); valid tokens per prompt: {lengths.tolist()}")
    return lengths.tolist()


class _AdaLayerNormZero(nn.Module):
    """LayerNorm modulated by `temb`: `linear(silu(temb))` gives shift, scale and the other
    `num_vectors - 2` vectors (gates, the MLP's shift and scale), returned `[B, 1, D]`."""

    def __init__(self, dim: int, num_vectors: int) -> None:
        super().__init__()
        self.num_vectors = num_vectors
        self.act = get_act_fn("silu")
        self.linear = ReplicatedLinear(dim, num_vectors * dim)
        self.norm = LayerNormScaleShift(dim, eps=1e-6)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        shift, scale, *rest = self.linear(self.act(temb)).unsqueeze(1).chunk(
            self.num_vectors, dim=2)
        return self.norm(x, shift, scale), *rest


class _AdaLayerNormContinuous(nn.Module):
    """The output norm: as `_AdaLayerNormZero`, but scale comes before shift (diffusers)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.act = get_act_fn("silu")
        self.linear = ReplicatedLinear(dim, 2 * dim)
        self.norm = LayerNormScaleShift(dim, eps=1e-6)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(self.act(temb).to(x.dtype)).unsqueeze(1).chunk(2, dim=2)
        return self.norm(x, shift, scale)


class _ConditionEmbedding(nn.Module):
    """`MLP(sinusoid(timestep)) [+ MLP(sinusoid(guidance))] + MLP(pooled text)`: the time
    embedding of the blocks (and, without guidance, of the token refiner)."""

    def __init__(self, dim: int, pooled_dim: int, guidance_embeds: bool) -> None:
        super().__init__()
        self.timestep_embedder = MLPEmbedder(_TIME_FREQ_DIM, dim, act="silu")
        self.text_embedder = MLPEmbedder(pooled_dim, dim, act="silu")
        self.guidance_embedder = (MLPEmbedder(_TIME_FREQ_DIM, dim, act="silu")
                                  if guidance_embeds else None)

    def forward(self, timestep: torch.Tensor, pooled: torch.Tensor,
                guidance: torch.Tensor | None = None) -> torch.Tensor:
        temb = self.timestep_embedder(_sinusoid(timestep, pooled.dtype))
        if self.guidance_embedder is not None:
            assert guidance is not None
            temb = temb + self.guidance_embedder(_sinusoid(guidance, pooled.dtype))
        return temb + self.text_embedder(pooled)


def _sinusoid(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return timestep_embedding(t, _TIME_FREQ_DIM, flip_sin_to_cos=True,
                              downscale_freq_shift=0).to(dtype)


class _RefinerAttention(nn.Module):

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_q = ReplicatedLinear(dim, dim)
        self.to_k = ReplicatedLinear(dim, dim)
        self.to_v = ReplicatedLinear(dim, dim)
        self.to_out = ReplicatedLinear(dim, dim)
        # At most a few hundred text tokens: the faster-kernel preference was measured on
        # long sequences only.
        self.attn = LocalAttention(num_heads, dim // num_heads,
                                   supported_attention_backends=_REFINER_ATTN_BACKENDS,
                                   use_preferred_backends=False)

    def forward(self, x: torch.Tensor, lengths: Sequence[int] | None) -> torch.Tensor:
        heads = (self.num_heads, -1)
        q, k, v = (proj(x).unflatten(2, heads) for proj in (self.to_q, self.to_k, self.to_v))
        return self.to_out(self.attn(q, k, v, lengths).flatten(2))


class _RefinerBlock(nn.Module):
    """Self-attention + MLP over the text tokens, gated by the refiner's time embedding."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _RefinerAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.ff = FeedForward(dim, int(dim * mlp_ratio), dim, "silu")
        self.norm_out = _Gates(dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor,
                lengths: Sequence[int] | None) -> torch.Tensor:
        gate_msa, gate_mlp = self.norm_out(temb)
        x = x + self.attn(self.norm1(x), lengths) * gate_msa
        return x + self.ff(self.norm2(x)) * gate_mlp


class _Gates(nn.Module):
    """`linear(silu(temb))` split into the refiner block's two gates `[B, 1, D]`."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.act = get_act_fn("silu")
        self.linear = ReplicatedLinear(dim, 2 * dim)

    def forward(self, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(self.act(temb)).unsqueeze(1).chunk(2, dim=2)


class HunyuanVideoTokenRefiner(nn.Module):
    """Text hidden states -> model width, refined by self-attention conditioned on the
    timestep and the masked mean of the text."""

    def __init__(self, config: HunyuanVideoTransformerConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.time_text_embed = _ConditionEmbedding(dim, config.text_embed_dim, False)
        self.proj_in = ReplicatedLinear(config.text_embed_dim, dim)
        self.token_refiner = _RefinerBlocks(config)

    def forward(self, text: torch.Tensor, timestep: torch.Tensor,
                lengths: Sequence[int]) -> torch.Tensor:
        """`text` `[B, L, text_embed_dim]`, item i's first `lengths[i]` tokens real."""
        mask = (torch.arange(text.shape[1], device=text.device)
                < torch.tensor(lengths, device=text.device)[:, None]).float().unsqueeze(-1)
        pooled = ((text * mask).sum(dim=1) / mask.sum(dim=1)).to(text.dtype)
        temb = self.time_text_embed(timestep, pooled)
        x = self.proj_in(text)
        padded = None if all(n == text.shape[1] for n in lengths) else lengths
        return self.token_refiner(x, temb, padded)


class _RefinerBlocks(nn.Module):

    def __init__(self, config: HunyuanVideoTransformerConfig) -> None:
        super().__init__()
        self.refiner_blocks = nn.ModuleList(
            _RefinerBlock(config.hidden_size, config.num_attention_heads, _REFINER_MLP_RATIO)
            for _ in range(config.num_refiner_layers))

    def forward(self, x: torch.Tensor, temb: torch.Tensor,
                lengths: Sequence[int] | None) -> torch.Tensor:
        for block in self.refiner_blocks:
            x = block(x, temb, lengths)
        return x


class _JointAttention(nn.Module):
    """Dual-stream attention: video and text have their own q/k/v/out projections and q/k
    norms, and attend together (video with RoPE, then text)."""

    def __init__(self, dim: int, num_heads: int, layer_idx: int) -> None:
        super().__init__()
        head_dim = dim // num_heads
        self.num_heads = num_heads
        self.to_q = ReplicatedLinear(dim, dim)
        self.to_k = ReplicatedLinear(dim, dim)
        self.to_v = ReplicatedLinear(dim, dim)
        self.add_q_proj = ReplicatedLinear(dim, dim)
        self.add_k_proj = ReplicatedLinear(dim, dim)
        self.add_v_proj = ReplicatedLinear(dim, dim)
        self.to_out = ReplicatedLinear(dim, dim)
        self.to_add_out = ReplicatedLinear(dim, dim)
        self.norm_q = RMSNorm(head_dim, eps=1e-6)
        self.norm_k = RMSNorm(head_dim, eps=1e-6)
        self.norm_added_q = RMSNorm(head_dim, eps=1e-6)
        self.norm_added_k = RMSNorm(head_dim, eps=1e-6)
        self.attn = DistributedAttention(num_heads, head_dim,
                                         supported_attention_backends=_JOINT_ATTN_BACKENDS,
                                         layer_idx=layer_idx)

    def forward(self, x: torch.Tensor, context: torch.Tensor, freqs: torch.Tensor,
                num_tokens: int, text_lengths: Sequence[int] | None,
                metadata: AttentionMetadata | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        heads = (self.num_heads, -1)
        # Each video input's all-to-all starts as soon as it is computed (see Wan).
        v = self.attn.scatter_heads(self.to_v(x).unflatten(2, heads))
        q = self.attn.scatter_heads(
            apply_rotary_emb(self.norm_q(self.to_q(x).unflatten(2, heads)), freqs))
        k = self.attn.scatter_heads(
            apply_rotary_emb(self.norm_k(self.to_k(x).unflatten(2, heads)), freqs))
        text = AppendedTokens(self.norm_added_q(self.add_q_proj(context).unflatten(2, heads)),
                              self.norm_added_k(self.add_k_proj(context).unflatten(2, heads)),
                              self.add_v_proj(context).unflatten(2, heads), text_lengths)
        out, text_out = self.attn.forward_joint(q, k, v, text, valid_len=num_tokens,
                                                metadata=metadata)
        return self.to_out(out.flatten(2)), self.to_add_out(text_out.flatten(2))


class HunyuanVideoTransformerBlock(nn.Module):
    """Dual-stream block: joint attention, then separate MLPs for video and text."""

    def __init__(self, config: HunyuanVideoTransformerConfig, layer_idx: int) -> None:
        super().__init__()
        dim = config.hidden_size
        mlp_dim = int(dim * config.mlp_ratio)
        self.norm1 = _AdaLayerNormZero(dim, 6)
        self.norm1_context = _AdaLayerNormZero(dim, 6)
        self.attn = _JointAttention(dim, config.num_attention_heads, layer_idx)
        self.norm2 = LayerNormScaleShift(dim, eps=1e-6)
        self.ff = FeedForward(dim, mlp_dim, dim, "gelu-approximate")
        self.norm2_context = LayerNormScaleShift(dim, eps=1e-6)
        self.ff_context = FeedForward(dim, mlp_dim, dim, "gelu-approximate")

    def forward(self, x: torch.Tensor, context: torch.Tensor, temb: torch.Tensor,
                freqs: torch.Tensor, num_tokens: int, text_lengths: Sequence[int] | None,
                attn_metadata: AttentionMetadata | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """`x` `[B, S, D]` (this rank's video tokens), `context` `[B, L, D]` (all text),
        `temb` `[B, D]`, `freqs` `[S, head_dim / 2, 2]`; `num_tokens`: real video tokens of
        the whole padded sequence; `text_lengths`: real text tokens per item (None: all);
        `attn_metadata`: for the joint attention's backend."""
        x_norm, gate, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, temb)
        c_norm, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(context, temb)
        attn_out, text_out = self.attn(x_norm, c_norm, freqs, num_tokens, text_lengths,
                                       attn_metadata)
        x = x + attn_out * gate
        context = context + text_out * c_gate
        x = x + gate_mlp * self.ff(self.norm2(x, shift_mlp, scale_mlp))
        context = context + c_gate_mlp * self.ff_context(
            self.norm2_context(context, c_shift_mlp, c_scale_mlp))
        return x, context


class HunyuanVideoSingleTransformerBlock(nn.Module):
    """Single-stream block: video and text share every weight; attention and MLP run in
    parallel from one norm, and one projection merges them."""

    def __init__(self, config: HunyuanVideoTransformerConfig, layer_idx: int) -> None:
        super().__init__()
        dim, head_dim = config.hidden_size, config.attention_head_dim
        mlp_dim = int(dim * config.mlp_ratio)
        self.num_heads = config.num_attention_heads
        self.norm = _AdaLayerNormZero(dim, 3)
        self.to_q = ReplicatedLinear(dim, dim)
        self.to_k = ReplicatedLinear(dim, dim)
        self.to_v = ReplicatedLinear(dim, dim)
        self.norm_q = RMSNorm(head_dim, eps=1e-6)
        self.norm_k = RMSNorm(head_dim, eps=1e-6)
        self.attn = DistributedAttention(self.num_heads, head_dim,
                                         supported_attention_backends=_JOINT_ATTN_BACKENDS,
                                         layer_idx=layer_idx)
        self.proj_mlp = ReplicatedLinear(dim, mlp_dim)
        self.proj_out = ReplicatedLinear(dim + mlp_dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, temb: torch.Tensor,
                freqs: torch.Tensor, num_tokens: int, text_lengths: Sequence[int] | None,
                attn_metadata: AttentionMetadata | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """As `HunyuanVideoTransformerBlock.forward`."""
        num_video = x.shape[1]
        # The per-token math runs on this rank's video tokens and the text at once.
        h = torch.cat([x, context], dim=1)
        h_norm, gate = self.norm(h, temb)
        mlp = linear_gelu_tanh(h_norm, self.proj_mlp.weight, self.proj_mlp.bias)
        heads = (self.num_heads, -1)
        q = self.norm_q(self.to_q(h_norm).unflatten(2, heads))
        k = self.norm_k(self.to_k(h_norm).unflatten(2, heads))
        v = self.to_v(h_norm).unflatten(2, heads)
        text = AppendedTokens(q[:, num_video:], k[:, num_video:], v[:, num_video:],
                              text_lengths)
        out, text_out = self.attn.forward_joint(
            apply_rotary_emb(q[:, :num_video], freqs), apply_rotary_emb(k[:, :num_video], freqs),
            v[:, :num_video], text, valid_len=num_tokens, metadata=attn_metadata)
        attn = torch.cat([out, text_out], dim=1).flatten(2)
        h = h + gate * self.proj_out(torch.cat([attn, mlp], dim=2))
        # Fresh tensors, not views of `h`: the next block's compiled graph guards on strides,
        # and a view's differ from a dual-stream block's outputs (a second graph otherwise;
        # `.contiguous()` keeps a batch-of-1 view, its batch stride being ignored).
        return with_fresh_strides(h[:, :num_video]), with_fresh_strides(h[:, num_video:])


class HunyuanVideoTransformer3DModel(nn.Module):
    """HunyuanVideo DiT (T2V). See `forward` for the inputs."""

    param_names_mapping: ClassVar[dict[str, str]] = {
        r"^x_embedder\.proj\.(weight|bias)$": r"x_embedder.\1",
        r"^(.*)\.to_out\.0\.(weight|bias)$": r"\1.to_out.\2",
        r"^(.*\.ff(?:_context)?)\.net\.0\.proj\.(weight|bias)$": r"\1.fc_in.\2",
        r"^(.*\.ff(?:_context)?)\.net\.2\.(weight|bias)$": r"\1.fc_out.\2",
        # Single-stream blocks hold their q/k/v projections and norms themselves.
        r"^(single_transformer_blocks\.\d+)\.attn\.(to_[qkv]|norm_[qk])\.(weight|bias)$":
            r"\1.\2.\3",
    }
    """Checkpoint name regex -> this model's name (first match wins)."""
    _repeated_blocks: ClassVar[tuple[str, ...]] = (
        "HunyuanVideoTransformerBlock", "HunyuanVideoSingleTransformerBlock")
    """Block classes `compile_repeated_blocks` compiles."""
    _compile_dynamic: ClassVar[bool | None] = None
    """The text length varies per prompt (cut to the longest real one): compiled with
    automatic dynamic shapes, a second length makes it symbolic instead of a graph per
    length (dynamo would stop compiling after 8)."""

    def __init__(self, **config: Any) -> None:
        super().__init__()
        self.config = HunyuanVideoTransformerConfig.from_dict(config)
        cfg = self.config
        dim = cfg.hidden_size
        self.x_embedder = nn.Conv3d(cfg.in_channels, dim, kernel_size=cfg.patch,
                                    stride=cfg.patch)
        self.context_embedder = HunyuanVideoTokenRefiner(cfg)
        self.time_text_embed = _ConditionEmbedding(dim, cfg.pooled_projection_dim,
                                                   cfg.guidance_embeds)
        # diffusers' `get_1d_rotary_pos_embed(use_real=True)`: interleaved pairs, as ours.
        self.rope = RotaryEmbedding3D(cfg.rope_axes_dim, _ROPE_MAX_POSITIONS, cfg.rope_theta)
        self.transformer_blocks = nn.ModuleList(
            HunyuanVideoTransformerBlock(cfg, i) for i in range(cfg.num_layers))
        # Layer indices continue, so per-layer attention settings (STA windows) are distinct.
        self.single_transformer_blocks = nn.ModuleList(
            HunyuanVideoSingleTransformerBlock(cfg, cfg.num_layers + i)
            for i in range(cfg.num_single_layers))
        self.norm_out = _AdaLayerNormContinuous(dim)
        self.proj_out = ReplicatedLinear(dim, cfg.out_channels * cfg.patch_size_t
                                         * cfg.patch_size**2)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> HunyuanVideoTransformer3DModel:
        """Build from a diffusers `config.json` dict (parameters uninitialised until loaded)."""
        return cls(**config)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> tuple[set[str], set[str]]:
        """Load diffusers-named tensors; returns (missing parameter names, unexpected checkpoint
        names). A shape mismatch raises ValueError naming the tensor."""
        return load_renamed_weights(self, weights, self.param_names_mapping)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor,
                pooled_projections: torch.Tensor, guidance: torch.Tensor | None = None,
                attn_metadata: AttentionMetadata | None = None,
                step_cache: BranchCache | None = None) -> torch.Tensor:
        """Predict the flow for latents `[B, C, T, H, W]`; returns `[B, out_channels, T, H, W]`.

        `timestep` `[B]` (0..1000, float or integer); `encoder_hidden_states` `[B, L,
        text_embed_dim]` with `encoder_attention_mask` `[B, L]` (1 for real tokens, a prefix
        of each row); `pooled_projections` `[B, pooled_projection_dim]`; `guidance` `[B]`:
        the embedded guidance scale times 1000 (as diffusers' pipeline passes it), required
        by, and only accepted by, configs with `guidance_embeds`. `attn_metadata`: the sliding
        tile config and step (from the denoising stage); the token grid and text length are
        filled in here. None: dense attention only. `step_cache`: with `reuse`, its residual
        (of the video tokens) replaces the blocks; else the blocks' residual is stored in it
        (`fastvideo.models.dits.step_cache`).
        """
        grid = token_grid(hidden_states.shape, self.config.patch)
        if timestep.ndim != 1:
            raise ValueError(f"timestep must be [B], got shape {tuple(timestep.shape)}")
        if (guidance is None) == self.config.guidance_embeds:
            raise ValueError("guidance must be given exactly when the config has "
                             f"guidance_embeds (it is {self.config.guidance_embeds})")
        if guidance is not None and guidance.ndim != 1:
            raise ValueError(f"guidance must be [B], got shape {tuple(guidance.shape)}")
        lengths = text_lengths(encoder_attention_mask, encoder_hidden_states.shape[1])
        # Columns past the longest prompt are padding in every row: dropped.
        num_text = max(lengths)
        context = self.context_embedder(encoder_hidden_states[:, :num_text], timestep, lengths)
        temb = self.time_text_embed(timestep, pooled_projections, guidance)
        padded_text = None if min(lengths) == num_text else lengths

        freqs = self.rope(grid, hidden_states.device)
        x = self.x_embedder(hidden_states).flatten(2).transpose(1, 2).contiguous()
        # Sequence parallel (as Wan): each sp rank keeps one contiguous block of the video
        # tokens (padded to a multiple of the sp size); the text is replicated.
        num_tokens = x.shape[1]
        x, freqs = shard_tokens(x, freqs)
        # Sliding tile attention tiles this grid; the text follows the video tokens.
        metadata = dataclasses.replace(attn_metadata or AttentionMetadata(), grid=grid,
                                       num_text_tokens=num_text)
        if step_cache is not None and step_cache.reuse:
            x = x + step_cache.residual  # the text stream only feeds the video tokens
        else:
            blocks_input = x
            for block in (*self.transformer_blocks, *self.single_transformer_blocks):
                x, context = block(x, context, temb, freqs, num_tokens, padded_text, metadata)
            if step_cache is not None:
                step_cache.residual = x - blocks_input

        x = self.proj_out(self.norm_out(x, temb))
        x = gather_tokens(x, num_tokens)
        return self._unpatchify(x, grid)

    def step_cache_input(self, hidden_states: torch.Tensor, timestep: torch.Tensor,
                         pooled_projections: torch.Tensor, guidance: torch.Tensor | None = None,
                         **context: Any) -> torch.Tensor:
        """The first dual-stream block's modulated video input for latents `[B, C, T, H, W]`
        at `timestep` `[B]`, over all tokens: what step caching compares from step to step.
        Its modulation depends on the pooled text and the guidance too (the rest of the
        context does not enter it)."""
        temb = self.time_text_embed(timestep, pooled_projections, guidance)
        x = self.x_embedder(hidden_states).flatten(2).transpose(1, 2)
        return self.transformer_blocks[0].norm1(x, temb)[0]

    def _unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """`[B, T'*H'*W', C*p_t*p_h*p_w]` (channels first, unlike Wan) -> `[B, C, T, H, W]`."""
        (num_t, num_h, num_w), (p_t, p_h, p_w) = grid, self.config.patch
        x = x.reshape(x.shape[0], num_t, num_h, num_w, -1, p_t, p_h, p_w)
        x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)
        return x.reshape(x.shape[0], x.shape[1], num_t * p_t, num_h * p_h, num_w * p_w)
