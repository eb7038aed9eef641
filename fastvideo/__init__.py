"""fastvideo: a modular diffusion engine for batch video generation."""

from typing import Any

__all__ = ["VideoGenerator"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import fastvideo` stays cheap and registries can be imported alone.
    if name == "VideoGenerator":
        from fastvideo.entrypoints.video_generator import VideoGenerator
        return VideoGenerator
    raise AttributeError(f"module 'fastvideo' has no attribute {name!r}")
