"""`python -m flows.bulk --dispatch worker` starts its warm worker before it imports Prefect,
torch and the stages, and asks for the very worker its shards then go to (the same spec: a
different one would load a second model on the GPU)."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fastvideo.fastvideo_args import SamplingParam
from fastvideo.jobs import worker_client
from fastvideo.jobs.options import EngineOptions
from flows.bulk import bulk
from flows.cli import FLOW_RUN_DEFAULTS, start_worker_from_argv
from flows.generate import generate
from tasks.dispatch import Dispatch
from tasks.prepare import prepare_run
from tasks.shard import worker_spec
from tests.flows.helpers import REPO

# The command, with the worker's start replaced by a record of what was asked and of what
# the process had imported by then; the process ends after its first act.
_RECORD = """
import json, os, runpy, sys
from fastvideo.jobs import worker_client
from flows import cli

out, module, *argv = sys.argv[1:]

def record(spec, idle_timeout_s=1800.0, wait=True, warm_up=None, **_):
    loaded = [m for m in ("prefect", "tasks.shard", "fastvideo.jobs.engine", "torch",
                          "fastvideo.attention.layer") if m in sys.modules]
    with open(out, "w") as f:
        json.dump({"spec": spec.to_json(), "wait": wait, "idle": idle_timeout_s,
                   "loaded": loaded, "warm_up": warm_up}, f)
    os._exit(0)

def first_act_only(argv, start=cli.start_worker_from_argv):
    start(argv)
    os._exit(0)

worker_client.ensure_worker = record
cli.start_worker_from_argv = first_act_only
sys.argv = [module, *argv]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def _first_act(tmp_path: Path, module: str, *argv: str) -> dict:
    out = tmp_path / f"asked-{module}.json"
    proc = subprocess.run([sys.executable, "-c", _RECORD, str(out), module, *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and out.exists(), f"no warm worker was started:\n" \
                                                  f"{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("flow_fn", [bulk.fn, generate.fn], ids=["bulk", "generate"])
def test_the_early_start_uses_the_flows_defaults(flow_fn) -> None:
    params = inspect.signature(flow_fn).parameters
    assert {name: params[name].default for name in FLOW_RUN_DEFAULTS} == FLOW_RUN_DEFAULTS


def test_the_command_starts_the_worker_its_shards_go_to_before_importing_prefect(
        tmp_path: Path, tiny_wan_path: Path) -> None:
    asked = _first_act(tmp_path, "flows.bulk", "--dataset", "unused.jsonl", "--output",
                       str(tmp_path / "out"), "--model-path", str(tiny_wan_path),
                       "--dispatch", "worker", "--compile", "--vae-dtype", "bf16",
                       "--worker-idle-timeout-s", "60", "--height", "32")
    assert asked["loaded"] == [] and asked["wait"] is False and asked["idle"] == 60.0
    # The run's video shape as given (the family has the rest): the worker warms up on it.
    assert asked["warm_up"] == {"height": 32}
    # The flow's own spec for its first shard, as the run computes it.
    ctx = prepare_run.fn(str(tiny_wan_path), str(tmp_path / "out"), str(tmp_path / "out"),
                         SamplingParam(), dispatch=Dispatch(mode="worker"),
                         options=EngineOptions(enable_torch_compile=True, vae_dtype="bf16"))
    assert json.loads(asked["spec"]) == json.loads(
        worker_spec(ctx, Dispatch(mode="worker")).to_json())

    # generate's command line does the same.
    asked = _first_act(tmp_path, "flows.generate", "--prompt", "a cat", "--output",
                       str(tmp_path / "out"), "--model-path", str(tiny_wan_path),
                       "--dispatch", "worker", "--compile", "--vae-dtype", "bf16")
    assert asked["loaded"] == [] and asked["warm_up"] == {}
    assert json.loads(asked["spec"])["model_fingerprint"] == ctx.model_fingerprint

    # Sliding tile options are checked before the start without the attention layers (they
    # import the compiler: ~1 s on 2 cores, seconds on a GPU node, on the critical path).
    config = tmp_path / "sta.json"
    config.write_text(json.dumps({"tile_size": [1, 2, 2], "default_window": [1, 1, 1]}))
    asked = _first_act(tmp_path, "flows.bulk", "--dataset", "unused.jsonl", "--output",
                       str(tmp_path / "out"), "--model-path", str(tiny_wan_path),
                       "--dispatch", "worker", "--compile", "--sta-config", str(config),
                       "--attention-backend", "SLIDING_TILE_ATTN")
    assert asked["loaded"] == []
    assert json.loads(json.loads(asked["spec"])["options"]["sta_config"]) == \
        json.loads(config.read_text())


@pytest.mark.parametrize("argv", [
    ["--dispatch", "inprocess"],  # nothing to start
    ["--dispatch", "worker", "--placement", "denoise"],  # the flow's process runs the rest
    ["--dispatch", "worker", "--attention-backend", "NOPE"],  # left for the flow to report
    ["--dispatch", "worker", "--height", "not-a-number"],  # argparse's error: the flow's
    ["--dispatch", "worker"],  # no --model-path: the flow's parser says so
], ids=["inprocess", "placement-denoise", "bad-option", "bad-number", "no-model"])
def test_no_early_worker_without_a_valid_worker_run(tiny_wan_path: Path, argv: list[str],
                                                    monkeypatch, capsys) -> None:
    asked = []
    monkeypatch.setattr(worker_client, "ensure_worker", lambda spec, *_, **__: asked.append(spec))
    model = [] if argv == ["--dispatch", "worker"] else ["--model-path", str(tiny_wan_path)]
    start_worker_from_argv(["--dataset", "d.jsonl", *model, *argv])
    assert asked == [] and capsys.readouterr() == ("", "")  # and it printed nothing
    start_worker_from_argv(["--dataset", "d.jsonl", "--model-path", str(tiny_wan_path),
                            "--dispatch", "worker"])
    assert len(asked) == 1  # the same call with a valid worker run starts one
