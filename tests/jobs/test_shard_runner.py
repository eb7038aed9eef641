"""The warm worker's shard runner: every stage of a shard in one process, lanes overlapped.

Overlap must not change a bit: the same checkpoints (by content digest) and the same
videos as running the lanes in turn.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import pytest

from fastvideo.fastvideo_args import SamplingParam
from fastvideo.jobs import shard_runner
from fastvideo.jobs.item_phases import WRITE_VIDEO, stage_names
from fastvideo.jobs.items import RunContext
from fastvideo.jobs.shard_runner import ShardRunner
from fastvideo.jobs.step_clock import FirstDenoiseClock
from fastvideo.pipelines.wan.wan_pipeline import WanPipeline
from tasks.dataset import make_shards, parse_rows
from tests.flows.helpers import PROMPTS, TINY

STAGES = stage_names(WanPipeline.phases)
DENOISE, DECODE = "denoise", "decode"


def _ctx(model: Path, store: Path) -> RunContext:
    return RunContext(model_path=str(model), model_fingerprint=None, store_uri=str(store),
                      output_uri=str(store), device="cpu", dtype="float32",
                      denoise_device="cpu", denoise_dtype="float32",
                      negative_prompt="blurry, static", max_sequence_length=16,
                      checkpoint_every=2, fps=8)


@pytest.fixture(scope="module")
def shard():
    items, invalid = parse_rows([{"prompt": p} for p in PROMPTS],
                                SamplingParam(negative_prompt="blurry, static",
                                              max_sequence_length=16, **TINY))
    assert not invalid
    (shard,) = make_shards(items, len(items))
    return shard


def test_overlap_equals_sequential_bit_for_bit(tiny_wan_path: Path, tmp_path: Path,
                                               shard, monkeypatch) -> None:
    events: list[dict] = []
    lock = threading.Lock()

    def emit(event: dict) -> None:
        with lock:
            events.append(event)

    digests = {}
    clock = FirstDenoiseClock(log=lambda *args: None)
    monkeypatch.setattr(shard_runner, "FIRST_DENOISE", clock)
    for overlap in (True, False):
        runner = ShardRunner(overlap=overlap)
        try:
            results = runner.run(_ctx(tiny_wan_path, tmp_path / f"overlap-{overlap}"), shard,
                                 emit)
        finally:
            runner.close()
        assert set(results) == set(STAGES)
        for stage in STAGES:
            assert all(r.ok for r in results[stage]), results[stage]
        digests[overlap] = {stage: [r.ref.digest for r in results[stage]] for stage in STAGES}
    # Every checkpoint's content digest and every video's sha256 are the same.
    assert digests[True] == digests[False]
    assert len(set(digests[True][WRITE_VIDEO])) == len(shard.items)
    steps = [e for e in events if e["event"] == "step"]
    assert len(steps) == 2 * len(shard.items) * TINY["num_inference_steps"]
    stage_events = [(e["stage"], e["item_id"]) for e in events if e["event"] == "stage"]
    assert len(stage_events) == 2 * len(STAGES) * len(shard.items)
    # The process's first denoise was timed step by step, once.
    assert clock.steps_s is not None and len(clock.steps_s) == TINY["num_inference_steps"]
    assert all(t > 0 for t in clock.steps_s)


def test_rerun_reuses_every_checkpoint(tiny_wan_path: Path, tmp_path: Path, shard) -> None:
    ctx = _ctx(tiny_wan_path, tmp_path)
    runner = ShardRunner()
    try:
        first = runner.run(ctx, shard, lambda e: None)
        second = runner.run(ctx, shard, lambda e: None)
    finally:
        runner.close()
    assert [r.ref.digest for r in second[DECODE]] == [r.ref.digest for r in first[DECODE]]
    assert all(r.info.get("reused") for r in second[DENOISE] + second[DECODE])


def _wait_for(predicate, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_a_shard_is_queued_whole_on_arrival_so_shards_run_in_arrival_order(
        tiny_wan_path: Path, tmp_path: Path) -> None:
    items, _ = parse_rows([{"prompt": p} for p in PROMPTS[:2]],
                          SamplingParam(negative_prompt="blurry, static",
                                        max_sequence_length=16, **TINY))
    first, second = make_shards(items, 1)
    ctx = _ctx(tiny_wan_path, tmp_path)
    runner = ShardRunner()
    gate = threading.Event()
    # The lane's queue (ThreadPoolExecutor's own) is what the GPU will run next.
    queued = runner._gpu._work_queue.qsize  # noqa: SLF001
    holder = threading.Thread(target=runner.on_gpu_lane, args=(gate.wait,))
    results: dict[int, dict] = {}
    callers = [threading.Thread(target=lambda s=s: results.__setitem__(
        s.index, runner.run(ctx, s, lambda e: None))) for s in (first, second)]
    try:
        holder.start()
        _wait_for(lambda: queued() == 0, "the lane to start the gate")
        callers[0].start()
        # The negative and the item's front, both queued while the GPU is busy elsewhere.
        _wait_for(lambda: queued() == 2, "the first shard's whole work on the lane")
        callers[1].start()
        _wait_for(lambda: queued() == 4, "the second shard's whole work on the lane")
        gate.set()
        for thread in (holder, *callers):
            thread.join(timeout=300)
    finally:
        gate.set()
        runner.close()
    assert all(r.ok for shard in results.values() for stage in shard.values() for r in stage)
    gpu_order = [e["item_id"] for e in runner.timeline.as_list() if e["lane"] == "gpu"]
    assert gpu_order == [first.items[0].item_id, second.items[0].item_id]


def test_videos_encoded_while_decoding_are_the_files_encoded_after(
        tiny_wan_path: Path, tmp_path: Path, shard, monkeypatch: pytest.MonkeyPatch) -> None:
    """The post lane streams each item's frames to the encoder as they are decoded
    (video_stream.py): the same videos as encoding after the decode, and no second encode."""
    from fastvideo.jobs import item_phases
    from fastvideo.jobs.video_stream import STREAM_VIDEO_ENV

    encoded_after: list[int] = []
    write_mp4 = item_phases.write_mp4

    def counted(*args, **kwargs):
        encoded_after.append(1)
        return write_mp4(*args, **kwargs)

    monkeypatch.setattr(item_phases, "write_mp4", counted)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    videos = {}
    for streaming in ("1", "0"):
        monkeypatch.setenv(STREAM_VIDEO_ENV, streaming)
        encoded_after.clear()
        runner = ShardRunner()
        try:
            results = runner.run(_ctx(tiny_wan_path, tmp_path / streaming), shard, lambda e: None)
        finally:
            runner.close()
        assert all(r.ok for r in results[WRITE_VIDEO]), results[WRITE_VIDEO]
        videos[streaming] = [(tmp_path / streaming / r.ref.key).read_bytes()
                             for r in results[WRITE_VIDEO]]
        assert len(encoded_after) == (0 if streaming == "1" else len(shard.items))
    assert videos["1"] == videos["0"]
    assert not list(scratch.glob("fastvideo-video-*"))  # each stream's folder removed
