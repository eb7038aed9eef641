"""Wan2.1 / Wan2.2 video DiT, the same math as diffusers' `WanTransformer3DModel`.

It loads diffusers' Wan safetensors unchanged (`param_names_mapping` renames the few modules
named differently here). Dtypes follow diffusers loaded with `torch_dtype=bf16`: the modules
in `_keep_in_fp32_modules` keep fp32 parameters (`to_compute_dtype` casts the rest), the
adaLN modulation, its LayerNorms and the gated residual adds run in fp32, everything else
in the compute dtype.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from fastvideo.attention import DistributedAttention, LocalAttention, _Backend
from fastvideo.attention.metadata import AttentionMetadata
from fastvideo.layers.activation import get_act_fn
from fastvideo.layers.embeddings import MLPEmbedder, timestep_embedding
from fastvideo.layers.layernorm import FP32LayerNorm, LayerNormScaleShift, RMSNorm
from fastvideo.layers.linear import ReplicatedLinear
from fastvideo.layers.mlp import FeedForward
from fastvideo.layers.rotary_embedding import RotaryEmbedding3D, apply_rotary_emb
from fastvideo.models.config_fields import strict_fields
from fastvideo.models.dits.sequence_shard import gather_tokens, shard_tokens, token_grid
from fastvideo.models.dits.step_cache import BranchCache
from fastvideo.models.loader.weight_utils import load_renamed_weights, map_checkpoint_name

ContextKV = tuple[torch.Tensor, ...]
"""A block's cross-attention keys and values: the text's (k, v), then for I2V the image's."""

# cuDNN attention behind SDPA beats flash_attn 2 on H100 (11.3 vs 18.3 ms for Wan-1.3B's
# 32760-token self-attention), so SDPA is the default; the others are there when requested.
_SELF_ATTN_BACKENDS = (_Backend.TORCH_SDPA, _Backend.FLASH_ATTN, _Backend.SLIDING_TILE_ATTN)
_CROSS_ATTN_BACKENDS = (_Backend.TORCH_SDPA, _Backend.FLASH_ATTN)


@dataclass(frozen=True, kw_only=True)
class WanTransformerConfig:
    """The keys of diffusers' `WanTransformer3DModel` `config.json`, with its defaults."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    """Patch size over (frames, height, width)."""
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int | None = 16
    """None: same as `in_channels`."""
    text_dim: int = 4096
    """Width of the text encoder's output."""
    freq_dim: int = 256
    """Width of the sinusoidal timestep embedding."""
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    """LayerNorm (with affine parameters) before the cross-attention."""
    qk_norm: str | None = "rms_norm_across_heads"
    """diffusers applies RMSNorm across heads to q and k whatever this says; so does this model."""
    eps: float = 1e-6
    image_dim: int | None = None
    """Width of the CLIP image embedding (Wan2.1 I2V); None for T2V."""
    added_kv_proj_dim: int | None = None
    """Input width of the image key/value projections; set together with `image_dim`."""
    rope_max_seq_len: int = 1024
    """Largest number of patches along any axis."""
    pos_embed_seq_len: int | None = None
    """Learned position embedding of the image tokens (Wan2.1 FLF2V)."""

    def __post_init__(self) -> None:
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size must have 3 entries (t, h, w), got {self.patch_size}")
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)
        if self.attention_head_dim % 2:
            raise ValueError(f"attention_head_dim must be even for RoPE, got {self.attention_head_dim}")
        if (self.image_dim is None) != (self.added_kv_proj_dim is None):
            raise ValueError("image_dim and added_kv_proj_dim must be set together (I2V) or both "
                             f"None, got {self.image_dim} and {self.added_kv_proj_dim}")
        if self.qk_norm != "rms_norm_across_heads":
            warnings.warn(f"qk_norm={self.qk_norm!r} is ignored: Wan (as diffusers) always applies "
                          "RMSNorm across heads to q and k", stacklevel=3)

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> WanTransformerConfig:
        """From a `config.json` dict; keys starting with `_` (diffusers metadata) are dropped."""
        return cls(**strict_fields(cls, config, "WanTransformer3DModel"))


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """`x + y * gate` in fp32 (gate is fp32), cast back to `x.dtype`: one `addcmul` pass where
    diffusers makes four."""
    return torch.addcmul(x, y, gate).to(x.dtype)


class _WanAttentionProjections(nn.Module):
    """The q/k/v/out projections and the q/k RMSNorm across heads of every Wan attention."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_q = ReplicatedLinear(dim, dim)
        self.to_k = ReplicatedLinear(dim, dim)
        self.to_v = ReplicatedLinear(dim, dim)
        self.to_out = ReplicatedLinear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)


class WanSelfAttention(_WanAttentionProjections):
    """Self-attention over all video tokens, with q/k RMSNorm across heads and 3D RoPE."""

    def __init__(self, dim: int, num_heads: int, eps: float, layer_idx: int | None = None) -> None:
        super().__init__(dim, num_heads, eps)
        self.attn = DistributedAttention(num_heads, dim // num_heads,
                                         supported_attention_backends=_SELF_ATTN_BACKENDS,
                                         layer_idx=layer_idx)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor, num_tokens: int | None = None,
                metadata: AttentionMetadata | None = None) -> torch.Tensor:
        """`num_tokens`: real tokens of the whole (possibly padded, sharded) sequence."""
        heads = (self.num_heads, -1)
        # Under sequence parallelism each input's all-to-all starts as soon as it is ready,
        # so it runs while the next projection computes; only k's is left exposed.
        v = self.attn.scatter_heads(self.to_v(x).unflatten(2, heads))
        q = self.attn.scatter_heads(
            apply_rotary_emb(self.norm_q(self.to_q(x)).unflatten(2, heads), freqs))
        k = self.attn.scatter_heads(
            apply_rotary_emb(self.norm_k(self.to_k(x)).unflatten(2, heads), freqs))
        out = self.attn(q, k, v, valid_len=num_tokens, metadata=metadata)
        return self.to_out(out.flatten(2))


class WanCrossAttention(_WanAttentionProjections):
    """Attention from video tokens to the text (and, for I2V, separately to the image) context."""

    def __init__(self, dim: int, num_heads: int, eps: float,
                 added_kv_proj_dim: int | None = None) -> None:
        super().__init__(dim, num_heads, eps)
        if added_kv_proj_dim is not None:
            self.add_k_proj = ReplicatedLinear(added_kv_proj_dim, dim)
            self.add_v_proj = ReplicatedLinear(added_kv_proj_dim, dim)
            self.norm_added_k = RMSNorm(dim, eps)
        # 512 text keys: cuDNN's kernel beats FlashAttention's CuTe kernel there
        # (benchmarks/RESULTS.md), so the faster-kernel preference is for self-attention only.
        self.attn = LocalAttention(num_heads, dim // num_heads,
                                   supported_attention_backends=_CROSS_ATTN_BACKENDS,
                                   use_preferred_backends=False)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        heads = (self.num_heads, -1)
        return self.attn(q, k.unflatten(2, heads), v.unflatten(2, heads)).flatten(2)

    def context_kv(self, context: torch.Tensor,
                   context_image: torch.Tensor | None = None) -> ContextKV:
        """Keys and values of the text context (then of the image's, for I2V)."""
        kv: ContextKV = (self.norm_k(self.to_k(context)), self.to_v(context))
        if context_image is not None:
            kv += (self.norm_added_k(self.add_k_proj(context_image)),
                   self.add_v_proj(context_image))
        return kv

    def forward(self, x: torch.Tensor, kv: ContextKV) -> torch.Tensor:
        q = self.norm_q(self.to_q(x)).unflatten(2, (self.num_heads, -1))
        out = self._attend(q, kv[0], kv[1])
        if len(kv) == 4:
            out = out + self._attend(q, kv[2], kv[3])
        return self.to_out(out)


class WanTransformerBlock(nn.Module):

    def __init__(self, config: WanTransformerConfig, layer_idx: int | None = None) -> None:
        super().__init__()
        dim, eps = config.hidden_size, config.eps
        self.norm1 = LayerNormScaleShift(dim, eps)
        self.attn1 = WanSelfAttention(dim, config.num_attention_heads, eps, layer_idx)
        self.norm2 = FP32LayerNorm(dim, eps) if config.cross_attn_norm else None
        self.attn2 = WanCrossAttention(dim, config.num_attention_heads, eps,
                                       config.added_kv_proj_dim)
        self.norm3 = LayerNormScaleShift(dim, eps)
        self.ffn = FeedForward(dim, config.ffn_dim, dim, "gelu-approximate")
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def modulation(self, timestep_proj: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Shift, scale and gate of the self-attention, then of the FFN, each `[B, 1, D]`
        (fp32)."""
        return (self.scale_shift_table + timestep_proj.float()).chunk(6, dim=1)

    def forward(self, x: torch.Tensor, context_kv: ContextKV, timestep_proj: torch.Tensor,
                freqs: torch.Tensor, num_tokens: int | None = None,
                attn_metadata: AttentionMetadata | None = None) -> torch.Tensor:
        """`x` `[B, S, D]`, `context_kv` this block's cross-attention keys and values
        (`WanCrossAttention.context_kv`), `timestep_proj` `[B, 6, D]`, `freqs`
        `[S, head_dim / 2, 2]` (cos, sin); under sequence parallelism `S` is this rank's
        block and `num_tokens` the real tokens of the whole padded sequence (None: no
        padding). `attn_metadata`: for the self-attention's backend."""
        shift, scale, gate, c_shift, c_scale, c_gate = self.modulation(timestep_proj)
        x = gated_residual(x, self.attn1(self.norm1(x, shift, scale), freqs, num_tokens,
                                           attn_metadata), gate)
        h = x if self.norm2 is None else self.norm2(x.float()).to(x.dtype)
        x = x + self.attn2(h, context_kv)
        return gated_residual(x, self.ffn(self.norm3(x, c_shift, c_scale)), c_gate)


class WanImageEmbedding(nn.Module):
    """CLIP image tokens -> model width (Wan2.1 I2V / FLF2V)."""

    def __init__(self, in_dim: int, out_dim: int, pos_embed_seq_len: int | None) -> None:
        super().__init__()
        self.norm1 = FP32LayerNorm(in_dim)
        self.ff = FeedForward(in_dim, in_dim, out_dim, "gelu")
        self.norm2 = FP32LayerNorm(out_dim)
        self.pos_embed = (nn.Parameter(torch.zeros(1, pos_embed_seq_len, in_dim))
                          if pos_embed_seq_len is not None else None)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:
            # FLF2V: first- and last-frame tokens of one sample sit in consecutive batch rows.
            _, seq_len, dim = image_embeds.shape
            image_embeds = image_embeds.view(-1, 2 * seq_len, dim) + self.pos_embed
        return self.norm2(self.ff(self.norm1(image_embeds)))


class WanConditionEmbedder(nn.Module):
    """Timestep -> (temb, 6 modulation vectors); text (and image) context -> model width."""

    def __init__(self, config: WanTransformerConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.freq_dim = config.freq_dim
        self.time_embedder = MLPEmbedder(config.freq_dim, dim, act="silu")
        self.act_fn = get_act_fn("silu")
        self.time_proj = ReplicatedLinear(dim, 6 * dim)
        self.text_embedder = MLPEmbedder(config.text_dim, dim, act="gelu_tanh")
        self.image_embedder = (WanImageEmbedding(config.image_dim, dim, config.pos_embed_seq_len)
                               if config.image_dim is not None else None)

    def time(self, timestep: torch.Tensor, dtype: torch.dtype
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(temb `[B, D]`, the blocks' modulation `[B, 6, D]`) in the compute `dtype`."""
        t_freq = timestep_embedding(timestep, self.freq_dim, flip_sin_to_cos=True,
                                    downscale_freq_shift=0)
        # The time embedder keeps fp32 weights; its output joins the compute dtype.
        t_freq = t_freq.to(self.time_embedder.linear_1.weight.dtype)
        temb = self.time_embedder(t_freq).to(dtype)
        return temb, self.time_proj(self.act_fn(temb)).unflatten(1, (6, -1))

    def context(self, text: torch.Tensor, image: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The text (and image) context at the model's width."""
        return self.text_embedder(text), self.image_embedder(image) if image is not None else None


class WanTransformer3DModel(nn.Module):
    """Wan video DiT. `forward(latents [B, C, T, H, W], text [B, L, text_dim], timestep [B])`."""

    param_names_mapping: ClassVar[dict[str, str]] = {
        r"^(.*)\.to_out\.0\.(weight|bias)$": r"\1.to_out.\2",
        r"^(.*\.ffn?)\.net\.0\.proj\.(weight|bias)$": r"\1.fc_in.\2",
        r"^(.*\.ffn?)\.net\.2\.(weight|bias)$": r"\1.fc_out.\2",
    }
    """Checkpoint name regex -> this model's name (first match wins)."""
    _ignored_checkpoint_names: ClassVar[re.Pattern[str]] = re.compile(r"\.norm_added_q\.")
    """Old I2V checkpoints carry a `norm_added_q` that diffusers ignores too."""
    _keep_in_fp32_modules: ClassVar[tuple[str, ...]] = (
        "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")
    """Parameters with one of these as a name component stay fp32 (diffusers' list, whose
    "rope" has no parameters here)."""

    def __init__(self, **config: Any) -> None:
        super().__init__()
        self.config = WanTransformerConfig.from_dict(config)
        cfg = self.config
        dim, head_dim = cfg.hidden_size, cfg.attention_head_dim
        h_dim = w_dim = 2 * (head_dim // 6)
        self.rope = RotaryEmbedding3D((head_dim - h_dim - w_dim, h_dim, w_dim),
                                      cfg.rope_max_seq_len)
        self.patch_embedding = nn.Conv3d(cfg.in_channels, dim, kernel_size=cfg.patch_size,
                                         stride=cfg.patch_size)
        self.condition_embedder = WanConditionEmbedder(cfg)
        self.blocks = nn.ModuleList(WanTransformerBlock(cfg, i) for i in range(cfg.num_layers))
        self.norm_out = LayerNormScaleShift(dim, cfg.eps)
        self.proj_out = ReplicatedLinear(dim, cfg.out_channels * math.prod(cfg.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> WanTransformer3DModel:
        """Build from a diffusers `config.json` dict (parameters uninitialised until loaded)."""
        return cls(**config)

    def to_compute_dtype(self, dtype: torch.dtype) -> WanTransformer3DModel:
        """Cast parameters to `dtype`, except those diffusers keeps in fp32."""
        for name, param in self.named_parameters():
            keep = any(part in self._keep_in_fp32_modules for part in name.split("."))
            param.data = param.data.to(torch.float32 if keep else dtype)
        return self

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> tuple[set[str], set[str]]:
        """Load diffusers-named tensors; returns (missing parameter names, unexpected checkpoint
        names). A shape mismatch raises ValueError naming the tensor."""
        return load_renamed_weights(self, weights, self.param_names_mapping,
                                    self._ignored_checkpoint_names)

    def _map_name(self, name: str) -> str:
        return map_checkpoint_name(name, self.param_names_mapping)

    def prepare_context(self, encoder_hidden_states: torch.Tensor,
                        encoder_hidden_states_image: torch.Tensor | None = None
                        ) -> dict[str, Any]:
        """`forward`'s context keywords with every block's cross-attention keys and values
        computed now: they depend on the text (and image) only, not on the step, so a
        denoising loop computes them once instead of at every step (bit for bit the same;
        with 512 text tokens against a small video's few hundred, that was ~45% of the
        blocks' matmuls)."""
        self._check_image_context(encoder_hidden_states_image)
        context, image = self.condition_embedder.context(encoder_hidden_states,
                                                         encoder_hidden_states_image)
        return {"encoder_hidden_states": None,
                "context_kv": tuple(block.attn2.context_kv(context, image)
                                    for block in self.blocks)}

    def _check_image_context(self, encoder_hidden_states_image: torch.Tensor | None) -> None:
        if (encoder_hidden_states_image is None) != (self.config.image_dim is None):
            raise ValueError("encoder_hidden_states_image must be given exactly when the config "
                             f"has image_dim (it has {self.config.image_dim})")

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                timestep: torch.Tensor,
                encoder_hidden_states_image: torch.Tensor | None = None,
                attn_metadata: AttentionMetadata | None = None,
                step_cache: BranchCache | None = None,
                context_kv: tuple[ContextKV, ...] | None = None) -> torch.Tensor:
        """Predict the flow for latents `[B, C, T, H, W]`; returns `[B, out_channels, T, H, W]`.

        `timestep` `[B]` may be integer or float. `encoder_hidden_states_image` (CLIP tokens)
        is required by, and only accepted by, I2V configs (`image_dim` set).
        `context_kv`: the blocks' cross-attention keys and values from `prepare_context`,
        in place of `encoder_hidden_states` (None) and `encoder_hidden_states_image`.
        `attn_metadata`: the sliding tile config and step (from the denoising stage); the
        token grid is filled in here. None: dense attention only.
        `step_cache`: with `reuse`, its residual replaces the blocks; else the blocks' residual
        is stored in it (`fastvideo.models.dits.step_cache`).
        """
        grid = token_grid(hidden_states.shape, self.config.patch_size)
        if timestep.ndim != 1:
            raise ValueError(f"timestep must be [B], got shape {tuple(timestep.shape)}")
        if (encoder_hidden_states is None) == (context_kv is None):
            raise ValueError("give exactly one of encoder_hidden_states and context_kv "
                             "(from prepare_context)")
        if context_kv is None:
            self._check_image_context(encoder_hidden_states_image)
        elif encoder_hidden_states_image is not None:
            raise ValueError("encoder_hidden_states_image is in context_kv already; "
                             "give it to prepare_context")
        # The time embedding joins the text's dtype, as diffusers' does.
        dtype = (encoder_hidden_states if context_kv is None else context_kv[0][0]).dtype
        freqs = self.rope(grid, hidden_states.device)
        # [B, D, T', H', W'] -> [B, S, D]; contiguous so every op below keeps a row-major layout.
        x = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()
        temb, timestep_proj = self.condition_embedder.time(timestep, dtype)

        # Sequence parallel: each sp rank keeps one contiguous block of the tokens (padded to
        # a multiple of the sp size), the text is replicated, and the output is gathered after
        # `proj_out`, where it is narrowest. With one rank each step returns its input.
        num_tokens = x.shape[1]
        x, freqs = shard_tokens(x, freqs)
        # Sliding tile attention tiles this token grid.
        metadata = dataclasses.replace(attn_metadata or AttentionMetadata(), grid=grid)
        if step_cache is not None and step_cache.reuse:
            x = x + step_cache.residual
        else:
            blocks_input = x
            if context_kv is None:
                context_kv = self.prepare_context(encoder_hidden_states,
                                                  encoder_hidden_states_image)["context_kv"]
            for block, kv in zip(self.blocks, context_kv, strict=True):
                x = block(x, kv, timestep_proj, freqs, num_tokens, metadata)
            if step_cache is not None:
                step_cache.residual = x - blocks_input

        shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        x = self.proj_out(self.norm_out(x, shift, scale))
        x = gather_tokens(x, num_tokens)
        return self._unpatchify(x, grid)

    def step_cache_input(self, hidden_states: torch.Tensor, timestep: torch.Tensor,
                         **context: Any) -> torch.Tensor:
        """The first block's modulated input for latents `[B, C, T, H, W]` at `timestep`
        `[B]`, over all tokens: what step caching compares from step to step. Costs the patch
        embedding, the time embedding and one norm; the text `context` does not enter it."""
        x = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2)
        _, timestep_proj = self.condition_embedder.time(timestep, x.dtype)
        shift, scale = self.blocks[0].modulation(timestep_proj)[:2]
        return self.blocks[0].norm1(x, shift, scale)

    def _unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """`[B, T'*H'*W', p_t*p_h*p_w*C]` -> `[B, C, T'*p_t, H'*p_h, W'*p_w]`."""
        (num_t, num_h, num_w), (p_t, p_h, p_w) = grid, self.config.patch_size
        x = x.reshape(x.shape[0], num_t, num_h, num_w, p_t, p_h, p_w, -1)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(x.shape[0], x.shape[1], num_t * p_t, num_h * p_h, num_w * p_w)
