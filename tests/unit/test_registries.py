"""The model and pipeline registries: lazy, loud, extensible."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fastvideo.models.registry import resolve_model
from fastvideo.pipelines.pipeline_registry import get_pipeline_class, pipeline_registry


def test_known_model_resolves_to_our_implementation() -> None:
    entry = resolve_model("WanTransformer3DModel", "diffusers")
    assert entry.library == "fastvideo"
    cls = entry.load_class()
    assert cls.__module__ == "fastvideo.models.dits.wanvideo"


def test_text_encoders_resolve_to_our_implementations() -> None:
    for name in ("UMT5EncoderModel", "T5EncoderModel", "CLIPTextModel", "LlamaModel"):
        cls = resolve_model(name, "transformers").load_class()
        assert cls.__module__.startswith("fastvideo.models.encoders."), name
        assert cls.__name__ == name


def test_library_component_resolves_to_its_library() -> None:
    entry = resolve_model("CLIPVisionModelWithProjection", "transformers")
    assert entry.library == "transformers"
    assert entry.load_class().__name__ == "CLIPVisionModelWithProjection"


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(ValueError, match="unknown model class 'NoSuchModel'") as info:
        resolve_model("NoSuchModel")
    for name in ("WanTransformer3DModel", "UMT5EncoderModel", "AutoencoderKLWan"):
        assert name in str(info.value)


def test_class_from_wrong_library_is_unknown() -> None:
    with pytest.raises(ValueError, match="AutoencoderKLWan"):
        resolve_model("AutoencoderKLWan", "transformers")


def test_wan_pipeline_is_discovered_through_entry_class() -> None:
    cls = get_pipeline_class("WanPipeline")
    assert cls.__module__ == "fastvideo.pipelines.wan.wan_pipeline"
    assert "WanPipeline" in pipeline_registry()


def test_unknown_pipeline_lists_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown pipeline 'Nope'.*WanPipeline"):
        get_pipeline_class("Nope")


def test_importing_registries_loads_no_models_or_cuda() -> None:
    code = ("import sys, fastvideo.models.registry, fastvideo.pipelines.pipeline_registry;"
            "bad=[m for m in sys.modules if m.startswith(('diffusers','transformers','prefect'))"
            " or m == 'fastvideo.models.dits.wanvideo'];"
            "import torch; assert not torch.cuda.is_initialized();"
            "assert not torch.distributed.is_initialized();"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
