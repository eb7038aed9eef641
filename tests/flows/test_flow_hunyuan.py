"""HunyuanVideo through the bulk flow, unchanged: an item with the family's embedded
guidance and one with true CFG set by its row, both equal to diffusers, and the
training parquet with both text encoders' outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from fastvideo.pipelines.hunyuan import family
from flows.bulk import bulk
from tests.flows.helpers import PROMPTS, checkpoint_latents, read_manifest, write_dataset

SIZE = dict(height=32, width=48, num_frames=5, num_inference_steps=3)
NEGATIVE = "blurry, static"


def _diffusers_latents(model: Path, prompt: str, seed: int, **request: object) -> torch.Tensor:
    from diffusers import HunyuanVideoPipeline

    pipe = HunyuanVideoPipeline.from_pretrained(model, dtype=torch.float32)
    return pipe(prompt=prompt, **SIZE, **request, generator=torch.Generator().manual_seed(seed),
                prompt_template={"template": family.PROMPT_TEMPLATE.template},
                output_type="latent").frames[0]


def test_bulk_runs_hunyuan_like_diffusers(prefect_server, tiny_hunyuan_path: Path,
                                          tmp_path: Path) -> None:
    rows = [{"item_id": "embedded", "prompt": PROMPTS[0], "seed": 11},
            {"item_id": "cfg", "prompt": PROMPTS[1], "seed": 12, "guidance_scale": 4.0,
             "embedded_guidance_scale": 3.5}]
    dataset = write_dataset(tmp_path / "prompts.jsonl", rows)
    output = tmp_path / "out"
    state = bulk(dataset=str(dataset), output=str(output), model_path=str(tiny_hunyuan_path),
                 negative_prompt=NEGATIVE, training_data=True, return_state=True, **SIZE)
    assert state.is_completed(), state.message
    manifest = read_manifest(str(output))
    # The family's defaults fill what the rows leave unset.
    assert manifest["embedded"]["embedded_guidance_scale"] == 6.0
    assert manifest["embedded"]["guidance_scale"] == 1.0
    references = {"embedded": dict(guidance_scale=6.0),
                  "cfg": dict(true_cfg_scale=4.0, guidance_scale=3.5, negative_prompt=NEGATIVE)}
    for item_id, request in references.items():
        row = manifest[item_id]
        assert row["status"] == "succeeded", row["error"]
        ref = _diffusers_latents(tiny_hunyuan_path, row["prompt"], row["seed"], **request)
        latents = checkpoint_latents(row["denoise_checkpoint_uri"])[0]
        # fp32 on CPU, as tests/pipelines/test_hunyuan_pipeline.py: 1e-4 relative L2.
        rel_l2 = ((latents - ref).norm() / ref.norm()).item()
        assert rel_l2 <= 1e-4, f"{item_id}: latents relative L2 {rel_l2:.2e}"

    training = {r["item_id"]: r for part in (output / "training").glob("*.parquet")
                for r in pq.read_table(part).to_pylist()}
    assert set(training) == {"embedded", "cfg"}
    for name in ("prompt_embeds", "prompt_attention_mask", "pooled_prompt_embeds", "latents"):
        example = training["cfg"]
        assert len(example[name]) == int(np.prod(example[f"{name}_shape"])), name
