"""Attention layers, backends and the backend selector."""

from fastvideo.attention.backends.abstract import AttentionBackend, AttentionImpl, _Backend
from fastvideo.attention.layer import DistributedAttention, LocalAttention
from fastvideo.attention.selector import ATTENTION_BACKEND_ENV, get_attn_backend

__all__ = [
    "ATTENTION_BACKEND_ENV",
    "AttentionBackend",
    "AttentionImpl",
    "DistributedAttention",
    "LocalAttention",
    "_Backend",
    "get_attn_backend",
]
