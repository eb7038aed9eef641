"""Phases as data: a pipeline's declaration is checked, and everything derives from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastvideo.fastvideo_args import FastVideoArgs, SamplingParam
from fastvideo.forward_batch import ForwardBatch
from fastvideo.jobs.item_phases import stage_names
from fastvideo.pipelines.builder import build_pipeline, model_phases
from fastvideo.pipelines.phases import Phase, check_phases, producers
from fastvideo.pipelines.wan.wan_pipeline import WanPipeline

STAGES = ("a", "b", "c")


def _phases(**changes) -> list[Phase]:
    phases = [Phase(name="one", stages=("a",), writes=("prompt_embeds",)),
              Phase(name="two", stages=("b",), reads=("prompt_embeds",), writes=("latents",),
                    denoise=True),
              Phase(name="three", stages=("c",), reads=("latents",), writes=("output",),
                    frames="output")]
    for index, phase in changes.items():
        phases[int(index[1:])] = phase
    return phases


def test_a_valid_declaration_and_its_producers() -> None:
    phases = _phases()
    check_phases(phases, STAGES, "P")
    assert [[p.name for p in producers(phases, i)] for i in range(3)] == [[], ["one"], ["two"]]
    assert Phase.from_dict(phases[1].to_dict()) == phases[1]


@pytest.mark.parametrize(("changes", "message"), [
    ({"p1": Phase(name="two", stages=("c",), writes=("latents",), denoise=True)},
     r"its phases run stages \['a', 'c', 'c'\], but its stages are \['a', 'b', 'c'\]"),
    ({"p1": Phase(name="two", stages=("b",), reads=("image_embeds",), writes=("latents",),
                  denoise=True)},
     "phase 'two' reads 'image_embeds', which no earlier phase writes"),
    ({"p1": Phase(name="one", stages=("b",), writes=("latents",), denoise=True)},
     "phase names repeat"),
    ({"p1": Phase(name="two", stages=("b",), writes=("latents",))},
     "exactly one phase must be the denoise phase"),
    ({"p2": Phase(name="three", stages=("c",), writes=("output",))},
     r"the last phase \('three'\) must name its frames field"),
])
def test_bad_declarations_say_what_is_wrong(changes, message) -> None:
    with pytest.raises(ValueError, match=message):
        check_phases(_phases(**changes), STAGES, "P")


def test_phase_fields_must_be_tuples() -> None:
    with pytest.raises(TypeError, match="Phase.writes must be a tuple of names"):
        Phase(name="x", stages=("a",), writes="latents")


def test_wan_declares_its_phases_and_modules(tiny_wan_path: Path) -> None:
    assert model_phases(str(tiny_wan_path)) == WanPipeline.phases
    assert stage_names(WanPipeline.phases) == (
        "encode-text", "prepare-latents", "denoise", "decode", "write-video")
    pipeline = build_pipeline(FastVideoArgs(model_path=str(tiny_wan_path), device="cpu"),
                              required_modules=())
    for phase in pipeline.phases:
        assert pipeline.stage_modules(phase.stages) == sorted(phase.modules)


def test_a_wrong_module_declaration_fails_the_build(tiny_wan_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = list(WanPipeline.phases)
    wrong[3] = Phase(name="decode", stages=("decoding_stage",), reads=("latents",),
                     writes=("output",), modules=("transformer",), frames="output")
    monkeypatch.setattr(WanPipeline, "phases", tuple(wrong))
    with pytest.raises(ValueError, match=r"phase 'decode' declares modules \['transformer'\], "
                                         r"but its stages use \['vae'\]"):
        build_pipeline(FastVideoArgs(model_path=str(tiny_wan_path), device="cpu"),
                       required_modules=())


def test_the_request_schema_is_sampling_params() -> None:
    request = ForwardBatch.request_field_names()
    assert request == ("prompt", *SamplingParam.option_names(), "request_id")
    assert "image" in request and "negative_prompt" in ForwardBatch.list_field_names()
