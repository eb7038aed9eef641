"""The shapes trainer on a CPU: both stages learn, the folder loads in the engine, a
resumed run equals an uninterrupted one, the shipped size stays within budget."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from fastvideo.training.build_model import (
    build_components,
    build_scheduler,
    estimate_size_mb,
    write_pipeline,
)
from fastvideo.training.evaluate import EvalConfig, evaluate, prompts_for, vae_accuracy
from fastvideo.training.shapes_data import split_combinations
from fastvideo.training.tiny_config import cpu_model, demo_model
from fastvideo.training.train import (
    MODEL,
    TrainConfig,
    Trainer,
    flow_pair,
    parse_args,
    shifted_sigma,
)


def _config(out, **changes) -> TrainConfig:
    # 32x32x5 clips, small batches: the Wan VAE runs frame by frame and is slow on a CPU.
    base = TrainConfig(out=str(out), model="cpu", height=32, width=32, num_frames=5,
                       vae_steps=2, dit_steps=6, vae_batch_size=2, dit_batch_size=4,
                       vae_lr=3e-3, dit_lr=3e-3, warmup_steps=1, max_sequence_length=32,
                       latent_pool=16, log_every=2, device="cpu")
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Trainer, Path]:
    out = tmp_path_factory.mktemp("shapes-train")
    trainer = Trainer(_config(out, vae_steps=4, dit_steps=12, latent_pool=0))  # fresh clips
    return trainer, trainer.run()


def test_train_lowers_losses_and_writes_the_folder(trained):
    trainer, model = trained
    vae, dit = trainer.losses["vae"], trainer.losses["dit"]
    assert (len(vae), len(dit)) == (4, 12)
    # Per-step losses are noisy (fresh clips, random timesteps); from random init both fall
    # well beyond that noise in a few steps at this learning rate.
    assert vae[-1] < vae[0], vae
    assert sum(dit[-4:]) / 4 < sum(dit[:4]) / 4, dit
    log = (trainer.out / "train_log.jsonl").read_text().splitlines()
    assert [(r["stage"], r["step"]) for r in map(json.loads, log)][-1] == ("dit", 12)
    assert model == trainer.out / MODEL
    provenance = json.loads((model / "training.json").read_text())
    assert provenance["progress"]["steps"] == {"vae": 4, "dit": 12}
    assert json.loads((model / "model_index.json").read_text())["_class_name"] == "WanPipeline"


def test_the_folder_loads_and_generates_in_the_engine(trained):
    from fastvideo import VideoGenerator

    generator = VideoGenerator.from_pretrained(trained[1], device="cpu")
    result = generator.generate_video("a red circle moves up on a black background", height=32,
                                      width=32, num_frames=5, num_inference_steps=2,
                                      guidance_scale=3.0, max_sequence_length=32)
    assert result.frames.shape == (5, 32, 32, 3)
    assert torch.isfinite(result.frames).all()


def test_evaluate_reports_both_splits(trained):
    config = EvalConfig(num_prompts=3, height=32, width=32, num_frames=5,
                        num_inference_steps=2, max_sequence_length=32, batch_size=2)
    report = evaluate(trained[1], config)
    assert set(report) == {"train", "held_out"}
    for split in report.values():  # a model this untrained scores whatever it scores
        assert set(split) == {"colour", "shape", "direction", "background", "all"}
        assert all(0.0 <= v <= 1.0 for v in split.values())
    _, held_out = split_combinations(config.held_out_fraction, seed=config.split_seed)
    assert set(prompts_for("held_out", config)) <= set(held_out)
    with pytest.raises(ValueError, match="unknown split"):
        prompts_for("test", config)


def test_resume_continues_as_if_uninterrupted(tmp_path):
    whole = Trainer(_config(tmp_path / "whole"))
    whole.run()

    first = Trainer(_config(tmp_path / "split", dit_steps=3))
    first.run()
    second = Trainer(_config(tmp_path / "split"))
    second.load_checkpoint()
    assert second.progress.steps == {"vae": 2, "dit": 3}
    second.run()
    assert second.progress.steps == {"vae": 2, "dit": 6}
    # Same ops in the same order on a CPU: bit-identical.
    assert second.losses["dit"] == whole.losses["dit"][3:]
    for a, b in zip(whole.ema, second.ema):
        assert torch.equal(a, b)


def test_resume_refuses_a_different_run(tmp_path):
    Trainer(_config(tmp_path, vae_steps=1, dit_steps=0)).run()
    with pytest.raises(ValueError, match="dit_lr"):
        Trainer(_config(tmp_path, dit_lr=1e-4)).load_checkpoint()
    with pytest.raises(ValueError, match="no checkpoint"):
        Trainer(_config(tmp_path / "empty")).load_checkpoint()


def test_config_errors_and_cli():
    with pytest.raises(ValueError, match="4k \\+ 1"):
        TrainConfig(out="x", num_frames=8)
    with pytest.raises(ValueError, match="caption_dropout"):
        TrainConfig(out="x", caption_dropout=1.0)
    config, resume = parse_args(["--out", "o", "--minutes", "9", "--dit-steps", "5", "--resume"])
    assert (config.minutes, config.dit_steps, config.vae_steps, resume) == (9.0, 5, None, True)


def test_shipped_model_fits_the_budget(tmp_path):
    config = demo_model()
    folder = write_pipeline(tmp_path, build_components(config, seed=0), config)
    size_mb = sum(f.stat().st_size for f in folder.rglob("*.safetensors")) / 1e6
    assert size_mb <= 30.0
    # The estimate ignores the few tensors kept in float32 and the file headers.
    assert abs(estimate_size_mb(config) - size_mb) < 0.05 * size_mb, size_mb


def test_training_text_embeddings_match_the_engines(tmp_path):
    from fastvideo.fastvideo_args import FastVideoArgs
    from fastvideo.pipelines.stages.text_encoding import T5EncodingStage

    trainer = Trainer(_config(tmp_path))
    trainer.components.text_encoder.eval()
    captions = ["a red circle moves up on a black background", "",
                "a white diamond moves to the left on a grey background"]
    stage = T5EncodingStage(trainer.components.text_encoder, trainer.components.tokenizer)
    args = FastVideoArgs(model_path=str(tmp_path), device="cpu")
    with torch.no_grad():
        engine = stage.encode(captions, 32, args)
        ours = trainer.encode_text(captions)
    # The engine runs the padded length with an attention mask, training the batch's
    # longest: masked positions add exp(-inf) = 0 to every softmax, so float noise only.
    torch.testing.assert_close(ours, engine, rtol=1e-5, atol=1e-6)


def test_training_pairs_follow_the_samplers_convention():
    """A DiT that returns exactly the training target for the noise it is given takes the
    folder's UniPC sampler from noise to x0: same timestep scale, same sign."""
    scheduler = build_scheduler(cpu_model())
    scheduler.set_timesteps(20)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, 2, 4, 4, generator=generator)
    x = torch.randn(x0.shape, generator=generator)
    for t in scheduler.timesteps:
        sigma = t.reshape(1).double() / 1000
        noise = (x - (1 - sigma) * x0) / sigma  # the noise that puts x0 at x at this level
        x_t, timestep, target = flow_pair(x0, noise, sigma)
        torch.testing.assert_close(timestep, t.reshape(1).double())
        torch.testing.assert_close(x_t.float(), x)
        x = scheduler.step(target.float(), t, x).prev_sample
    # Timesteps are rounded to integers, so the oracle is off by < 1/1000 in sigma per step.
    torch.testing.assert_close(x, x0, atol=1e-2, rtol=0)
    assert torch.allclose(shifted_sigma(torch.tensor([0.0, 1.0]), 2.0), torch.tensor([0.0, 1.0]))


def test_engine_modules_match_the_classes_trained(trained):
    """The engine runs its own DiT and UMT5 on the folder; they must compute what the
    diffusers and transformers classes that were trained compute (float32 here)."""
    from diffusers import WanTransformer3DModel
    from transformers import UMT5EncoderModel

    from fastvideo import VideoGenerator

    folder = trained[1]
    pipeline = VideoGenerator.from_pretrained(folder, device="cpu").pipeline
    tokens = trained[0].components.tokenizer(
        ["a red circle moves up on a black background", ""], padding="longest",
        return_tensors="pt")
    reference_text = UMT5EncoderModel.from_pretrained(folder / "text_encoder",
                                                      dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    text = torch.randn(2, 32, reference_text.config.d_model, generator=generator)
    latents = torch.randn(2, 4, 2, 8, 8, generator=generator)
    timestep = torch.tensor([999.0, 250.0])
    reference_dit = WanTransformer3DModel.from_pretrained(folder / "transformer",
                                                          torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ours = pipeline.get_module("text_encoder")(tokens.input_ids, tokens.attention_mask)
        theirs = reference_text(tokens.input_ids, tokens.attention_mask)
        # float32 both sides, different kernels and summation orders: ~1e-6 apart.
        torch.testing.assert_close(ours.last_hidden_state, theirs.last_hidden_state,
                                   rtol=1e-4, atol=1e-5)
        ours = pipeline.get_module("transformer")(hidden_states=latents, timestep=timestep,
                                                  encoder_hidden_states=text)
        theirs = reference_dit(hidden_states=latents, timestep=timestep,
                               encoder_hidden_states=text).sample
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_vae_accuracy_scores_reconstructions(trained):
    config = EvalConfig(num_prompts=4, height=32, width=32, num_frames=5, batch_size=2)
    report = vae_accuracy(trained[1], config)
    assert set(report) == {"colour", "shape", "direction", "background", "all"}
    assert all(0.0 <= v <= 1.0 for v in report.values())


def test_speed_tricks_table_counts_the_work_of_each_trick(trained):
    from fastvideo.training.speed_tricks import Trick, judge, markdown

    config = EvalConfig(num_prompts=2, height=32, width=32, num_frames=5,
                        num_inference_steps=4, max_sequence_length=32, batch_size=2)
    tricks = [Trick("baseline"), Trick("2 steps", sampling={"num_inference_steps": 2}),
              Trick("guidance half", sampling={"guidance_end": 0.5}),
              Trick("cache", engine={"step_cache_threshold": 1e9}),
              Trick("sta", sta_windows=(1, 1, 1)),
              Trick("sta, 2 dense steps", sta_windows=(1, 1, 1), sta_full_steps=2)]
    rows = judge(trained[1], tricks, config)
    # Per video: 4 steps x (cond + uncond) = 8 branch passes of the blocks.
    passes = {row["trick"]: row["block_passes_per_video"] for row in rows}
    assert passes == {"baseline": 8, "2 steps": 4, "guidance half": 6, "cache": 4, "sta": 8,
                      "sta, 2 dense steps": 8}
    assert [row["work_vs_first"] for row in rows] == [1.0, 0.5, 0.75, 0.5, 1.0, 1.0]
    # 32x32x5: a (2, 4, 4) token grid, 2 x 1 x 1 tiles of (1, 4, 4); one of two key tiles,
    # and with 2 of the 4 steps dense, 3 of 4 on average.
    assert [row["sta_density"] for row in rows[-2:]] == [0.5, 0.75]
    assert all(set(row["accuracy"]) == {"colour", "shape", "direction", "background", "all"}
               for row in rows)
    table = markdown(rows).splitlines()
    assert len(table) == 2 + len(tricks) and table[2].startswith("| baseline |")


def test_speed_tricks_cli_takes_full_names_and_rejects_unknown_ones(capsys):
    from fastvideo.training.speed_tricks import default_tricks, main

    # Names hold commas, so --only takes one whole name per flag.
    assert any("," in trick.name for trick in default_tricks())
    with pytest.raises(SystemExit):
        main(["--model", "unused", "--only", "STA window (3, 2, 2)", "--only", "fast mode"])
    err = capsys.readouterr().err
    assert "unknown tricks ['fast mode']" in err
