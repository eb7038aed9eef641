"""Component loading: formats we accept, and errors that name the bad file or name."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastvideo.entrypoints.video_generator import VideoGenerator
from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.models.loader.component_loader import load_component, read_model_index
from fastvideo.models.loader.weight_utils import WeightFileError, find_weight_files

DIT_FILE = "diffusion_pytorch_model.safetensors"


@pytest.fixture
def ckpt(tiny_wan_path: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny checkpoint that a test may damage."""
    return Path(shutil.copytree(tiny_wan_path, tmp_path / "ckpt"))


def _args(path: Path) -> FastVideoArgs:
    return FastVideoArgs(model_path=str(path), device="cpu")


def _load(path: Path, name: str):
    return load_component(name, read_model_index(path)[name], path, _args(path))


def _edit_index(path: Path, **changes) -> None:
    index_path = path / "model_index.json"
    index = json.loads(index_path.read_text())
    index.update(changes)
    index_path.write_text(json.dumps(index))


def test_unknown_pipeline_class_name(ckpt: Path) -> None:
    _edit_index(ckpt, _class_name="FooVideoPipeline")
    with pytest.raises(ValueError, match=r"unknown pipeline 'FooVideoPipeline'; known pipelines: .*WanPipeline"):
        VideoGenerator.from_pretrained(ckpt, device="cpu")


def test_unknown_component_class(ckpt: Path) -> None:
    _edit_index(ckpt, vae=["diffusers", "AutoencoderKLFoo"])
    with pytest.raises(ValueError, match=r"unknown model class 'AutoencoderKLFoo'.*known classes: .*AutoencoderKLWan"):
        VideoGenerator.from_pretrained(ckpt, device="cpu")


def test_missing_model_index(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "model_index.json")):
        VideoGenerator.from_pretrained(tmp_path, device="cpu")


def test_missing_component_folder(ckpt: Path) -> None:
    shutil.rmtree(ckpt / "vae")
    with pytest.raises(FileNotFoundError, match=f"component folder for 'vae' not found: {ckpt / 'vae'}"):
        VideoGenerator.from_pretrained(ckpt, device="cpu")


def test_missing_weight_file(ckpt: Path) -> None:
    os.remove(ckpt / "transformer" / DIT_FILE)
    with pytest.raises(WeightFileError, match=f"no weight files .* in {ckpt / 'transformer'}"):
        _load(ckpt, "transformer")


@pytest.mark.parametrize(("component", "file_name"), [
    ("transformer", DIT_FILE),            # our own model's loader
    ("text_encoder", "model.safetensors"),  # a transformers-format checkpoint, our encoder
])
def test_truncated_safetensors_names_the_file(ckpt: Path, component: str, file_name: str) -> None:
    path = ckpt / component / file_name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightFileError, match=str(path)):
        _load(ckpt, component)


def test_garbage_safetensors_header_names_the_file(ckpt: Path) -> None:
    path = ckpt / "transformer" / DIT_FILE
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(WeightFileError, match=str(path)):
        _load(ckpt, "transformer")


def test_sharded_checkpoint_loads_like_single_file(ckpt: Path) -> None:
    folder = ckpt / "transformer"
    state = load_file(folder / DIT_FILE)
    names = sorted(state)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half],
              "model-00002-of-00002.safetensors": names[half:]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, folder / shard)
    (folder / f"{DIT_FILE}.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}))
    reference = _load(ckpt, "transformer")
    os.remove(folder / DIT_FILE)
    assert [p.name for p in find_weight_files(folder)] == sorted(shards)
    sharded = _load(ckpt, "transformer")
    for (name, a), (_, b) in zip(reference.state_dict().items(), sharded.state_dict().items()):
        assert torch.equal(a, b), name


def test_missing_shard_is_named(ckpt: Path) -> None:
    folder = ckpt / "transformer"
    (folder / f"{DIT_FILE}.index.json").write_text(json.dumps(
        {"weight_map": {"x": "model-00009-of-00009.safetensors"}}))
    with pytest.raises(WeightFileError, match="model-00009-of-00009.safetensors"):
        _load(ckpt, "transformer")


class _RunsCode:
    def __reduce__(self):
        return (print, ("this pickle runs code",))


def test_pickle_with_code_is_refused(ckpt: Path) -> None:
    folder = ckpt / "transformer"
    os.remove(folder / DIT_FILE)
    torch.save({"weight": _RunsCode()}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(WeightFileError, match=r"refusing to load .*diffusion_pytorch_model.bin.*weights_only=True"):
        _load(ckpt, "transformer")


def test_plain_tensor_pickle_loads_with_weights_only(ckpt: Path) -> None:
    folder = ckpt / "transformer"
    reference = _load(ckpt, "transformer")
    torch.save(load_file(folder / DIT_FILE), folder / "diffusion_pytorch_model.bin")
    os.remove(folder / DIT_FILE)
    loaded = _load(ckpt, "transformer")
    for (name, a), (_, b) in zip(reference.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_load_renamed_weights_takes_a_rename_table_or_a_name_map_with_shards() -> None:
    from torch import nn

    from fastvideo.models.loader.weight_utils import load_renamed_weights, regex_name_map

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(2, 2, bias=False)
            self.fused = nn.Parameter(torch.zeros(4, 2))  # gate rows, then up rows

            def load_part(param: torch.Tensor, tensor: torch.Tensor, shard_id: int) -> None:
                param[2 * shard_id:2 * shard_id + 2].copy_(tensor)

            self.fused.weight_loader = load_part

    model = Toy()
    proj, gate, up = torch.randn(2, 2), torch.ones(2, 2), 2 * torch.ones(2, 2)
    missing, unexpected = load_renamed_weights(
        model, [("layer.proj.weight", proj), ("layer.extra", proj)], {r"^layer\.": ""})
    assert torch.equal(model.proj.weight, proj)
    assert (missing, unexpected) == ({"fused"}, {"layer.extra"})
    name_map = regex_name_map({r"^gate\.weight$": ("fused", "0"), r"^up\.weight$": ("fused", "1")})
    missing, _ = load_renamed_weights(model, [("gate.weight", gate), ("up.weight", up)], name_map)
    assert torch.equal(model.fused, torch.cat([gate, up])) and missing == {"proj.weight"}


def test_prefetch_asks_for_every_weight_file_and_skips_the_rest(tiny_wan_path: Path,
                                                                tmp_path: Path) -> None:
    """A fresh worker's first act: the page cache starts filling with every component's
    weights (and nothing else) while CUDA starts and the pipeline imports."""
    import shutil

    from fastvideo.models.loader.weight_utils import prefetch_model_files

    weights = [path for folder in sorted(tiny_wan_path.iterdir()) if folder.is_dir()
               and any(folder.glob("*.safetensors"))
               for path in find_weight_files(folder)]
    assert {p.parent.name for p in weights} == {"text_encoder", "transformer", "vae"}
    assert prefetch_model_files(tiny_wan_path) == sum(p.stat().st_size for p in weights)
    # A component folder without weights, or no model at all: nothing asked, no error (the
    # load reports those, naming the file).
    copy = tmp_path / "model"
    shutil.copytree(tiny_wan_path, copy)
    for path in (copy / "vae").glob("*.safetensors"):
        path.unlink()
    assert prefetch_model_files(copy) == sum(p.stat().st_size for p in weights
                                             if p.parent.name != "vae")
    assert prefetch_model_files(tmp_path / "missing") == 0


def test_wan_vae_gets_the_lean_ops_on_every_device_and_channels_last_on_cuda_only(
        tiny_wan_path: Path) -> None:
    from fastvideo.models.vae_lean_ops import LEAN_OPS_ATTR
    from fastvideo.models.vae_speed import CHANNELS_LAST_ATTR

    vae = _load(tiny_wan_path, "vae")
    assert getattr(vae, LEAN_OPS_ATTR, False)
    assert not hasattr(vae, CHANNELS_LAST_ATTR)  # slower on the CPU
    assert "forward" in vars(vae.decoder.conv_in)


def test_unipc_scheduler_gets_the_sync_free_corrector(tiny_wan_path: Path) -> None:
    from fastvideo.models.schedulers.state import get_scheduler_state
    from fastvideo.models.schedulers.sync_free import is_sync_free

    scheduler = _load(tiny_wan_path, "scheduler")
    assert type(scheduler).__name__ == "UniPCMultistepScheduler" and is_sync_free(scheduler)
    # Nothing of it in the state a progress checkpoint saves.
    assert not any("uni_c" in key for key in get_scheduler_state(scheduler))
