"""Wan2.1 image-to-video through the bulk flow: equal to diffusers, images from a dataset
column (relative to the dataset file, absolute, or a store URI), bad images failing only
their item, and a model that does not fit the dataset refused at the start."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from fastvideo.storage import open_store, read_checkpoint
from flows.bulk import bulk
from tests.flows.helpers import (
    PROMPTS,
    checkpoint_latents,
    read_manifest,
    task_states,
    write_dataset,
)

SIZE = dict(height=32, width=48, num_frames=5, num_inference_steps=4, guidance_scale=5.0)
NEGATIVE = "blurry, static"


def _image(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(path)
    return path


def _diffusers(model: Path, prompt: str, image: Path, seed: int) -> tuple[torch.Tensor,
                                                                           torch.Tensor]:
    """diffusers' final latents and frames for one item."""
    import diffusers.pipelines.wan.pipeline_wan_i2v as reference
    from diffusers import WanImageToVideoPipeline

    if not hasattr(reference, "ftfy"):  # see tests/parity/test_wan_i2v_pipeline.py
        reference.ftfy = types.SimpleNamespace(fix_text=lambda text: text)
    pipe = WanImageToVideoPipeline.from_pretrained(model, dtype=torch.float32)
    captured: dict[str, torch.Tensor] = {}

    def keep(pipe, step, t, kwargs):
        captured["latents"] = kwargs["latents"]
        return kwargs

    frames = pipe(image=Image.open(image).convert("RGB"), prompt=prompt,
                  negative_prompt=NEGATIVE, **SIZE, generator=torch.Generator().manual_seed(seed),
                  output_type="np", callback_on_step_end=keep).frames[0]
    return captured["latents"][0], torch.from_numpy(frames)


def _frames(uri: str) -> torch.Tensor:
    """The frames of a decode checkpoint at a full URI (as written in the manifest)."""
    root, key = uri.split("/checkpoints/", 1)
    return read_checkpoint(open_store(root), f"checkpoints/{key}").output[0]


def test_bulk_i2v_equals_diffusers_and_bad_images_fail_alone(
        prefect_server, tiny_wan_i2v_path: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    relative = _image(data / "images" / "first.png", 0)
    absolute = _image(tmp_path / "elsewhere" / "second.png", 1)
    (data / "images" / "notes.png").write_bytes(b"these are notes, not a picture")
    rows = [
        {"item_id": "relative", "prompt": PROMPTS[0], "image": "images/first.png", "seed": 11},
        {"item_id": "absolute", "prompt": PROMPTS[1], "image": str(absolute), "seed": 12},
        {"item_id": "missing", "prompt": PROMPTS[2], "image": "images/gone.png", "seed": 13},
        {"item_id": "not-an-image", "prompt": PROMPTS[2], "image": "images/notes.png"},
    ]
    dataset = write_dataset(data / "prompts.jsonl", rows)
    output = tmp_path / "out"
    checkpoints = str(tmp_path / "checkpoints")
    state = bulk(dataset=str(dataset), output=str(output), model_path=str(tiny_wan_i2v_path),
                 negative_prompt=NEGATIVE, training_data=True, checkpoint_store=checkpoints,
                 return_state=True, **SIZE)
    assert state.is_failed()  # two bad images
    manifest = read_manifest(str(output))
    for item_id in ("relative", "absolute"):
        assert manifest[item_id]["status"] == "succeeded", manifest[item_id]["error"]
    # A bad image fails its own item, in the phase that reads it, naming the file.
    missing, junk = manifest["missing"], manifest["not-an-image"]
    assert missing["status"] == junk["status"] == "failed"
    assert missing["failed_stage"] == junk["failed_stage"] == "encode-image"
    assert str(data / "images" / "gone.png") in missing["error"]
    assert "notes.png" in junk["error"]
    assert manifest["relative"]["image"] == str(relative)

    for item_id, image in (("relative", relative), ("absolute", absolute)):
        row = manifest[item_id]
        ref_latents, ref_frames = _diffusers(tiny_wan_i2v_path, row["prompt"], image, row["seed"])
        latents = checkpoint_latents(row["denoise_checkpoint_uri"])[0]
        rel_l2 = ((latents - ref_latents).norm() / ref_latents.norm()).item()
        assert rel_l2 <= 1e-4, f"{item_id}: latents relative L2 {rel_l2:.2e}"
        # The decode checkpoint holds the frames as the video does (uint8): diffusers'
        # frames rounded the same way differ by at most one level, where a value sits on
        # a rounding boundary.
        ours = _frames(row["decode_checkpoint_uri"]).int()
        theirs = (ref_frames.clamp(0, 1) * 255).round().int()
        assert (ours - theirs).abs().max().item() <= 1, item_id

    # The training parquet carries the image's embeddings and conditioning latents too.
    training = {r["item_id"]: r for part in (output / "training").glob("*.parquet")
                for r in pq.read_table(part).to_pylist()}
    assert set(training) == {"relative", "absolute"}
    for name in ("prompt_embeds", "image_embeds", "condition_latents", "latents"):
        example = training["relative"]
        assert len(example[name]) == int(np.prod(example[f"{name}_shape"])), name

    # The same image under the same name but with other pixels is other work; the text's
    # checkpoint is the same (same store).
    _image(relative, 5)
    write_dataset(dataset, rows[:1])
    state = bulk(dataset=str(dataset), output=str(tmp_path / "again"),
                 model_path=str(tiny_wan_i2v_path), negative_prompt=NEGATIVE,
                 checkpoint_store=checkpoints, return_state=True, **SIZE)
    assert state.is_completed(), state.message
    again = read_manifest(str(tmp_path / "again"))["relative"]
    assert again["encode_image_checkpoint_uri"] != manifest["relative"][
        "encode_image_checkpoint_uri"]
    assert again["encode_text_checkpoint_uri"] == manifest["relative"]["encode_text_checkpoint_uri"]
    assert again["encode_text_seconds"] == 0.0  # reused from the store, not computed


def test_a_model_that_does_not_fit_the_dataset_is_refused_at_start(
        prefect_server, tiny_wan_path: Path, tiny_wan_i2v_path: Path, tmp_path: Path) -> None:
    image = _image(tmp_path / "a.png", 0)
    with_images = write_dataset(tmp_path / "with.jsonl", [{"prompt": "a cat", "image": "a.png"}])
    without = write_dataset(tmp_path / "without.jsonl", [{"prompt": "a cat"}])
    cases = [(tiny_wan_path, with_images, "WanPipeline takes no image, but 1 item(s)"),
             (tiny_wan_i2v_path, without,
              "WanImageToVideoPipeline makes a video from an image, but 1 item(s)")]
    for model, dataset, message in cases:
        output = tmp_path / f"out-{model.name}"
        state = bulk(dataset=str(dataset), output=str(output), model_path=str(model),
                     return_state=True, **SIZE)
        assert state.is_failed()
        assert message in str(state.result(raise_on_failure=False))
        assert not (output / "manifest.parquet").exists()  # nothing ran
        states = task_states(state.state_details.flow_run_id)
        assert not any(name.startswith("encode-text") for name in states), states
    assert image.is_file()
