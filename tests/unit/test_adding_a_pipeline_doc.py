"""docs/adding_a_pipeline.md works as written: its code blocks build a package whose
pipeline is found through the entry-point group and runs on a tiny checkpoint."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import tomllib
import torch

import fastvideo.pipelines.pipeline_registry as registry_module
from fastvideo import VideoGenerator

DOC = Path(__file__).resolve().parents[2] / "docs" / "adding_a_pipeline.md"


def _code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.S)


def _install_doc_package(root: Path) -> None:
    """Write each python block to the file its first-line comment names; register the
    entry point from the toml block with a minimal dist-info, as pip would."""
    for block in _code_blocks("python"):
        first_line = block.splitlines()[0]
        assert first_line.startswith("# "), f"block without a file name: {first_line!r}"
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


def test_guide_example_runs_through_the_registry(tiny_wan_path: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _install_doc_package(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(registry_module, "_registry", None)  # rediscover with the new package

    cls = registry_module.get_pipeline_class("StyledWanPipeline")
    assert cls.__module__ == "my_video_pipelines.styled_wan"
    assert "WanPipeline" in registry_module.pipeline_registry()  # built-ins still found

    import run_styled

    result = run_styled.run(str(tiny_wan_path))
    assert "prompt_style_stage" in result.timings
    assert Path(result.video_path).is_file() and result.video_path.startswith(str(tmp_path))

    # The custom stage's effect, checked against the stock pipeline given the styled prompt.
    stock = VideoGenerator.from_pretrained(tiny_wan_path, device="cpu").generate_video(
        "a fox in the snow, watercolor painting", height=32, width=32, num_frames=5,
        num_inference_steps=2, seed=7)
    assert torch.equal(result.latents, stock.latents)
    for name in [m for m in sys.modules if m.startswith(("run_styled", "my_video_pipelines"))]:
        del sys.modules[name]
