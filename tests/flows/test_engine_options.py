"""Engine options end to end: checked when a run starts, carried to every process that runs
a stage, and in checkpoint keys only where they change results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fastvideo.fastvideo_args import SamplingParam
from fastvideo.jobs.denoise import DenoiseJob
from fastvideo.jobs.item_phases import _request_params, denoise_item, stage_key
from fastvideo.jobs.options import EngineOptions
from fastvideo.pipelines.hunyuan.hunyuan_pipeline import HunyuanVideoPipeline
from fastvideo.pipelines.wan.wan_pipeline import WanPipeline
from flows.bulk import bulk
from flows.generate import generate
from tasks.dataset import parse_rows
from tasks.dispatch import Dispatch
from tasks.prepare import prepare_run
from tests.flows.helpers import REPO, TINY, task_states, write_dataset

STA = {"tile_size": "auto", "num_full_steps": 1, "default_window": [1, 2, 2]}


def _keys(ctx) -> dict[str, str]:
    return {phase.name: stage_key(ctx, phase, {"x": 1}, "digest")
            for phase in WanPipeline.phases}


def test_only_options_that_change_results_enter_checkpoint_keys(tiny_wan_path: Path,
                                                                tmp_path: Path) -> None:
    def ctx(**options: Any):
        return prepare_run.fn(str(tiny_wan_path), str(tmp_path), str(tmp_path), SamplingParam(),
                              options=EngineOptions(**options))

    plain = _keys(ctx())
    # Same math, another kernel or schedule: every key is the same, work is reused.
    for options in ({"attention_backend": "TORCH_SDPA"}, {"enable_torch_compile": True},
                    {"batch_cfg": False}, {"batch_cfg": True},
                    {"compile_cache_dir": str(tmp_path)}):
        assert _keys(ctx(**options)) == plain, options
    # Sparse attention changes the denoised latents only; the VAE's dtype the frames only.
    sta = _keys(ctx(sta_config=json.dumps(STA)))
    assert [s for s in plain if sta[s] != plain[s]] == ["denoise"]
    vae = _keys(ctx(vae_dtype="bfloat16"))
    assert [s for s in plain if vae[s] != plain[s]] == ["decode"]
    # Skipping steps changes the denoised latents only, and each threshold its own.
    step = _keys(ctx(step_cache_threshold=0.1))
    assert [s for s in plain if step[s] != plain[s]] == ["denoise"]
    assert _keys(ctx(step_cache_threshold=0.2))["denoise"] != step["denoise"]
    assert _keys(ctx(step_cache_threshold=1)) == _keys(ctx(step_cache_threshold=1.0))
    # Formatting of the STA file is not a different config.
    spaced = _keys(ctx(sta_config=json.dumps(STA, indent=4)))
    assert spaced == sta


def test_step_cache_threshold_is_checked_and_keys_the_denoise_phase_only() -> None:
    for value in (0, -1, float("nan"), float("inf"), "x", True):
        with pytest.raises(ValueError, match=r"step_cache_threshold must be a finite number "
                                             r"> 0 \(or None: off\), got "):
            EngineOptions(step_cache_threshold=value)
    options = EngineOptions(step_cache_threshold=0.15)
    assert {p.name: options.phase_params(p) for p in WanPipeline.phases} == {
        "encode-text": {}, "prepare-latents": {}, "denoise": {"step_cache": 0.15}, "decode": {}}
    assert EngineOptions().phase_params(WanPipeline.phases[2]) == {}
    # Checked options are FastVideoArgs' as they are (asdict), the threshold included.
    assert options.to_args("/m", "cpu", None).step_cache_threshold == 0.15


def test_step_cache_on_a_dit_without_it_fails_at_run_start(tiny_hunyuan_path: Path,
                                                           tiny_wan_path: Path,
                                                           tmp_path: Path) -> None:
    """Both of our DiTs skip steps; a model whose transformer class cannot (here a VAE class
    in its place) is refused before any task runs."""
    import shutil

    options = EngineOptions(step_cache_threshold=0.1)
    for path in (tiny_wan_path, tiny_hunyuan_path):
        ctx = prepare_run.fn(str(path), str(tmp_path), str(tmp_path), SamplingParam(),
                             options=options)
        assert ctx.options.step_cache_threshold == 0.1
    other = tmp_path / "other-dit"
    shutil.copytree(tiny_wan_path, other)
    index = json.loads((other / "model_index.json").read_text())
    index["transformer"] = ["diffusers", "AutoencoderKLWan"]
    (other / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="step_cache_threshold=0.1 needs a DiT that supports "
                                         "step caching .*AutoencoderKLWan does not"):
        prepare_run.fn(str(other), str(tmp_path), str(tmp_path), SamplingParam(),
                       options=options)


@pytest.mark.parametrize("pipeline", [WanPipeline, HunyuanVideoPipeline])
def test_guidance_end_keys_prepare_latents_not_text(pipeline, tiny_wan_path: Path,
                                                    tmp_path: Path) -> None:
    """`guidance_end` is a request field of prepare-latents (and, through input digests,
    of the later phases), not of text encoding: a run that changes it reuses the text."""
    ctx = prepare_run.fn(str(tiny_wan_path), str(tmp_path), str(tmp_path), SamplingParam())
    items, invalid = parse_rows([{"prompt": "a cat", "seed": 1},
                                 {"prompt": "a cat", "seed": 1, "guidance_end": 0.5}],
                                SamplingParam(negative_prompt="blurry"))
    assert not invalid and [i.guidance_end for i in items] == [1.0, 0.5]
    phases = {p.name: p for p in pipeline.phases}

    def key(phase: str, item) -> str:
        return stage_key(ctx, phases[phase], _request_params(phases[phase], item))

    assert key("encode-text", items[0]) == key("encode-text", items[1])
    assert key("prepare-latents", items[0]) != key("prepare-latents", items[1])
    # At its neutral value (what outputs made before the option did) it stays out of the
    # key, so checkpoints of earlier runs are reused after an upgrade.
    assert "guidance_end" not in _request_params(phases["prepare-latents"], items[0])
    assert _request_params(phases["prepare-latents"], items[1])["guidance_end"] == 0.5


def test_manifest_rows_older_than_guidance_end_are_the_same_request() -> None:
    from tasks.dataset import _same_request

    items, _ = parse_rows([{"prompt": "a cat", "seed": 1},
                           {"prompt": "a cat", "seed": 1, "guidance_end": 0.5}],
                          SamplingParam(negative_prompt="blurry"))
    old_row = {k: v for k, v in items[0].request().items() if k != "guidance_end"}
    assert _same_request(old_row, items[0])
    assert not _same_request(old_row, items[1])
    # A neutral value is the option's default: what a request that leaves it out gets.
    from fastvideo.fastvideo_args import NEUTRAL_OPTIONS

    defaults = SamplingParam()
    assert {name: getattr(defaults, name) for name in NEUTRAL_OPTIONS} == NEUTRAL_OPTIONS


def test_every_engine_option_is_a_flow_parameter() -> None:
    import dataclasses
    import inspect

    from flows.cli import ENGINE_OPTIONS, run_settings

    assert set(ENGINE_OPTIONS) == {f.name for f in dataclasses.fields(EngineOptions)}
    for flow_fn in (bulk.fn, generate.fn):
        names = inspect.signature(flow_fn).parameters
        assert set(inspect.signature(run_settings).parameters) <= set(names), flow_fn
        # ... and so is every sampling option (None: the model family's).
        assert {n for n in SamplingParam.option_names() if n != "seed"} <= {
            n for n, p in names.items() if p.default is None}, flow_fn


def test_denoise_jobs_carry_the_options(tiny_wan_path: Path, tmp_path: Path) -> None:
    options = EngineOptions(batch_cfg=False, step_cache_threshold=0.25,
                            sta_config=json.dumps(STA), enable_torch_compile=True)
    ctx = prepare_run.fn(str(tiny_wan_path), str(tmp_path), str(tmp_path), SamplingParam(),
                         options=options)
    job = DenoiseJob(model_path=ctx.model_path, store_uri=ctx.store_uri,
                     items=(denoise_item(ctx, WanPipeline.phases[2], "a", []),), options=options)
    # A torchrun worker reads the job from JSON and builds its engine args from it.
    args = DenoiseJob.from_json(job.to_json()).engine_args(world_size=2, sp_size=2)
    assert (args.attention_backend, args.batch_cfg, args.enable_torch_compile, args.sp_size,
            args.step_cache_threshold) == ("SLIDING_TILE_ATTN", False, True, 2, 0.25)
    assert json.loads(Path(args.sta_config).read_text()) == STA


def test_batch_cfg_unset_pairs_guidance_under_sequence_parallelism_only(tmp_path: Path) -> None:
    """Unset, guidance runs as one batch of 2 where the pair hides all-to-alls (sp > 1);
    on one device as two forwards; a value given anywhere wins."""
    from fastvideo.fastvideo_args import FastVideoArgs

    def args(**kw: Any) -> FastVideoArgs:
        return FastVideoArgs(model_path=str(tmp_path), device="cpu", **kw)

    assert args().batch_cfg is False
    assert args(num_gpus=2).batch_cfg is True  # sp_size defaults to num_gpus
    assert args(num_gpus=2, sp_size=1).batch_cfg is False  # two replicas, no sp
    assert args(batch_cfg=True).batch_cfg is True
    assert args(num_gpus=2, batch_cfg=False).batch_cfg is False
    assert EngineOptions().to_args(str(tmp_path), "cpu", None).batch_cfg is False
    assert EngineOptions().to_args(str(tmp_path), "cpu", None, num_gpus=2).batch_cfg is True
    assert EngineOptions(batch_cfg=True).to_args(str(tmp_path), "cpu", None).batch_cfg is True
    with pytest.raises(ValueError, match=r"batch_cfg must be true, false or null .* got 'yes'"):
        EngineOptions(batch_cfg="yes")
    # The command line: unset unless a flag is given.
    import argparse

    from flows.cli import add_options, given_options

    parser = argparse.ArgumentParser()
    add_options(parser)
    assert given_options(parser.parse_args(["--batch-cfg"]))["batch_cfg"] is True
    assert given_options(parser.parse_args(["--no-batch-cfg"]))["batch_cfg"] is False
    assert "batch_cfg" not in given_options(parser.parse_args([]))


@pytest.mark.parametrize(("option", "value", "message"), [
    ("attention_backend", "NOPE", r"attention_backend: unknown attention backend 'NOPE'; "
                                  r"valid: \[.*'TORCH_SDPA'"),
    ("vae_dtype", "fp8", r"vae_dtype: unknown dtype 'fp8'; known: \["),
    ("sta_config", "missing.json", r"sta_config 'missing.json' is not a file"),
    ("step_cache_threshold", 0, r"step_cache_threshold must be a finite number > 0 "
                                r"\(or None: off\), got 0"),
    ("guidance_end", 2, r"guidance_end must be a number in \[0, 1\], got 2"),
    ("dispatch", "slurm", r"dispatch must be one of \['inprocess', 'worker', 'torchrun', "
                          r"'deployment'\], got 'slurm'"),
    ("placement", "gpu", r"placement must be 'all' or 'denoise', got 'gpu'"),
    ("worker_idle_timeout_s", 0, r"worker_idle_timeout_s must be > 0, got 0"),
])
def test_bad_options_fail_the_run_at_its_start(prefect_server, tiny_wan_path: Path,
                                               tmp_path: Path, option: str, value: Any,
                                               message: str) -> None:
    dataset = write_dataset(tmp_path / "prompts.jsonl", [{"prompt": "a cat"}])
    state = bulk(dataset=str(dataset), output=str(tmp_path / "out"),
                 model_path=str(tiny_wan_path), return_state=True, **TINY, **{option: value})
    assert state.is_failed()
    with pytest.raises(ValueError, match=message):
        state.result()
    # Nothing ran: no task, no output.
    assert task_states(state.state_details.flow_run_id) == {}
    assert not (tmp_path / "out").exists()


def test_bad_sta_config_content_names_the_option(tmp_path: Path) -> None:
    path = tmp_path / "sta.json"
    path.write_text(json.dumps({"default_window": [0, 1, 1]}))
    with pytest.raises(ValueError, match=r"sta_config is not a valid sliding tile attention "
                                         r"config: default_window must be three positive ints"):
        EngineOptions.with_sta_file(str(path))
    with pytest.raises(ValueError, match="sta_config is used by the SLIDING_TILE_ATTN backend "
                                         "only, but attention_backend='TORCH_SDPA'"):
        EngineOptions(sta_config=json.dumps(STA), attention_backend="TORCH_SDPA")


def test_placement_all_on_the_gpu_pool_needs_no_gpu_and_no_weights(tmp_path: Path) -> None:
    ctx = prepare_run.fn("/models/wan-on-the-gpu-node", str(tmp_path), str(tmp_path),
                         SamplingParam(), dispatch=Dispatch(mode="deployment"))
    # Every stage runs on the GPU node, in bf16 on CUDA; its worker fingerprints the model.
    assert (ctx.device, ctx.dtype, ctx.denoise_device, ctx.denoise_dtype) == \
        ("cuda", "bfloat16", "cuda", "bfloat16")
    assert ctx.model_fingerprint is None and ctx.model_path == "/models/wan-on-the-gpu-node"
    assert Dispatch(mode="deployment").deployment_name == "gpu-shard/gpu-shard"
    assert Dispatch(mode="worker").remote_stages and Dispatch(mode="deployment").remote_stages
    # Placement denoise keeps the other stages here; torchrun only ever denoises.
    assert not Dispatch(mode="deployment", placement="denoise").remote_stages
    assert Dispatch(mode="deployment", placement="denoise").deployment_name == \
        "denoise-job/gpu-denoise"
    assert not Dispatch(mode="torchrun").remote_stages
    with pytest.raises(ValueError, match="placement 'all' needs a warm worker"):
        Dispatch(mode="torchrun", placement="all")
    with pytest.raises(ValueError, match="denoise_device/denoise_dtype split the stages"):
        prepare_run.fn("/m", str(tmp_path), str(tmp_path), SamplingParam(),
                       denoise_device="cpu", dispatch=Dispatch(mode="deployment"))


def test_cli_takes_every_engine_option(tmp_path: Path) -> None:
    import argparse

    from flows.cli import add_options, given_options

    parser = argparse.ArgumentParser()
    add_options(parser)
    given = given_options(parser.parse_args([
        "--dispatch", "worker", "--placement", "all", "--attention-backend", "FLASH_ATTN",
        "--sta-config", "sta.json", "--compile", "--no-batch-cfg", "--vae-dtype", "bf16",
        "--compile-cache-dir", "/cache", "--worker-idle-timeout-s", "60", "--sp-size", "1",
        "--step-cache-threshold", "0.1", "--guidance-end", "0.5"]))
    assert given == {"dispatch": "worker", "placement": "all",
                     "attention_backend": "FLASH_ATTN", "sta_config": "sta.json",
                     "enable_torch_compile": True, "batch_cfg": False, "vae_dtype": "bf16",
                     "compile_cache_dir": "/cache", "worker_idle_timeout_s": 60.0,
                     "sp_size": 1, "step_cache_threshold": 0.1, "guidance_end": 0.5}
    # The command line names the option in its error and exits non-zero before any work.
    dataset = write_dataset(tmp_path / "p.jsonl", [{"prompt": "a cat"}])
    proc = subprocess.run(
        [sys.executable, "-m", "flows.bulk", "--dataset", str(dataset), "--output",
         str(tmp_path / "o"), "--model-path", str(tmp_path), "--attention-backend", "NOPE"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "attention_backend: unknown attention backend 'NOPE'" in proc.stdout + proc.stderr
