"""docs/adding_a_pipeline.md works as written.

Its python blocks build a package whose pipeline is found through the entry-point group,
passes the phase checks and makes the same video as the built-in WanImageToVideoPipeline;
the parity test it shows passes; its excerpts are still our code; its `model_index.json`
example lists the components of a Wan2.1 I2V checkpoint, all of known classes.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
from PIL import Image

import fastvideo.pipelines.pipeline_registry as registry_module
from fastvideo import VideoGenerator
from fastvideo.models.registry import resolve_model
from fastvideo.pipelines.phases import check_phases
from fastvideo.pipelines.wan.wan_i2v_pipeline import WanImageToVideoPipeline
from fastvideo.pipelines.wan.wan_pipeline import WanPipeline

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "adding_a_pipeline.md"
EXCERPT = "# excerpt: "
DOC_MODULES = ("my_video_pipelines", "run_i2v", "test_my_wan_i2v")


def _code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.S)


def _install_doc_package(root: Path) -> None:
    """Write each python block (excerpts aside) to the file its first-line comment names;
    register the entry point from the toml block with a minimal dist-info, as pip would."""
    for block in _code_blocks("python"):
        first_line = block.splitlines()[0]
        assert first_line.startswith("# "), f"block without a file name: {first_line!r}"
        if first_line.startswith(EXCERPT):
            continue
        path = root / first_line[2:].strip()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(block)
    (root / "my_video_pipelines" / "__init__.py").touch()
    (toml_block,) = _code_blocks("toml")
    entry_points = tomllib.loads(toml_block)["project"]["entry-points"]["fastvideo.pipelines"]
    dist_info = root / "my_video_pipelines-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-video-pipelines\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(
        "[fastvideo.pipelines]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))


@pytest.fixture
def doc_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The doc's package installed under `tmp_path`, which is also the working folder."""
    _install_doc_package(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(registry_module, "_registry", None)  # rediscover with the new package
    yield tmp_path
    for name in [m for m in sys.modules if m.split(".")[0] in DOC_MODULES]:
        del sys.modules[name]


def test_guide_example_runs_through_the_registry(doc_package: Path,
                                                 tiny_wan_i2v_path: Path) -> None:
    cls = registry_module.get_pipeline_class("MyWanI2VPipeline")
    assert cls.__module__ == "my_video_pipelines.wan_i2v"
    registry = registry_module.pipeline_registry()
    assert registry["WanPipeline"] is WanPipeline  # built-ins still found
    assert registry["WanImageToVideoPipeline"] is WanImageToVideoPipeline
    assert cls.requires_image
    # The guide spells out the built-in's phases; they must not drift apart.
    assert cls.phases == WanImageToVideoPipeline.phases

    image = doc_package / "first.png"
    pixels = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image)
    import run_i2v

    result = run_i2v.run(str(tiny_wan_i2v_path), str(image))
    # Timings hold one entry per stage, in the order the stages ran.
    check_phases(cls.phases, list(result.timings), cls.__name__)
    assert Path(result.video_path).is_file()
    assert result.video_path.startswith(str(doc_package))

    stock = VideoGenerator.from_pretrained(tiny_wan_i2v_path, device="cpu").generate_video(
        run_i2v.PROMPT, image=str(image), **run_i2v.OPTIONS)
    # Same stages over the same modules, weights, seed and image in one process: the same
    # operations in the same order, so bit-equal.
    assert torch.equal(result.latents, stock.latents)
    assert torch.equal(result.frames, stock.frames)

    import test_my_wan_i2v

    # The guide's parity test, given the session's checkpoint: its fixture builds the same one.
    test_my_wan_i2v.test_matches_diffusers(tiny_wan_i2v_path)


def test_excerpts_are_still_our_code() -> None:
    excerpts = [b for b in _code_blocks("python") if b.startswith(EXCERPT)]
    assert excerpts
    for block in excerpts:
        first_line, body = block.split("\n", 1)
        source = REPO / first_line.removeprefix(EXCERPT).strip()
        assert body in source.read_text(), f"the guide's excerpt of {source} is out of date"


def test_model_index_example_lists_a_wan_i2v_checkpoint(tiny_wan_i2v_path: Path) -> None:
    (block,) = _code_blocks("json")
    index = json.loads(block)
    tiny = json.loads((tiny_wan_i2v_path / "model_index.json").read_text())

    def components(model_index: dict) -> set[str]:
        # Pipeline options (`boundary_ratio: null`) and entries saved as [null, null]
        # (Wan2.2's second expert) are not components.
        return {name for name, spec in model_index.items()
                if isinstance(spec, list) and spec[0] is not None}

    assert index["_class_name"] == tiny["_class_name"]
    assert components(index) == components(tiny)
    assert components(index) == set(WanImageToVideoPipeline._required_config_modules)
    for name in components(index):
        resolve_model(index[name][1], index[name][0])  # raises for a class we cannot build

    (error_block,) = _code_blocks("text")
    quoted = error_block.strip().removeprefix("ValueError: ").removesuffix("...")
    with pytest.raises(ValueError) as error:
        resolve_model("CogVideoXTransformer3DModel", "diffusers")
    assert str(error.value).startswith(quoted)
