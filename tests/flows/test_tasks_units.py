"""Task logic without the engine or a Prefect server: datasets, keys, manifests (`.fn()`)."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from fastvideo.fastvideo_args import SamplingParam
from fastvideo.jobs.items import ItemResult
from fastvideo.storage import CheckpointRef, open_store
from tasks.common import shard_cache_key
from tasks.dataset import make_shards, parse_rows, plan_items
from tasks.dispatch import Dispatch
from tasks.manifest import read_manifest, shard_rows, write_manifest

DEFAULTS = SamplingParam(negative_prompt="blurry", height=32, width=32, num_frames=5,
                         num_inference_steps=4, seed=11)


def test_item_ids_and_seeds_are_stable_when_rows_are_added() -> None:
    rows = [{"prompt": "a cat"}, {"prompt": "a dog", "seed": 5}, {"prompt": "a cat"}]
    items, invalid = parse_rows(rows, DEFAULTS)
    grown, _ = parse_rows([*rows, {"prompt": "a bird"}], DEFAULTS)
    assert not invalid
    assert [i.item_id for i in grown[:3]] == [i.item_id for i in items]
    assert items[2].item_id == f"{items[0].item_id}-1"  # a repeated row gets its own id
    assert items[1].seed == 5 and items[0].seed != items[2].seed
    assert [i.seed for i in grown[:3]] == [i.seed for i in items]
    assert items[0].shared_negative and items[0].negative_prompt == "blurry"


def test_row_values_are_checked_and_coerced() -> None:
    rows = [{"prompt": "ok", "height": 64.0, "guidance_scale": 3, "negative_prompt": "dark"},
            {"prompt": "x", "seed": -1}, {"prompt": 3}, {"prompt": "y", "width": float("nan")},
            {"prompt": "z", "width": None}]
    items, invalid = parse_rows(rows, DEFAULTS)
    assert [(i.prompt, i.height, i.width, i.guidance_scale, i.shared_negative, i.row)
            for i in items] == [("ok", 64, 32, 3.0, False, 0), ("z", 32, 32, 5.0, True, 4)]
    assert [e.row for e in invalid] == [1, 2, 3]
    assert "seed must be an integer in [0, 2**63), got -1" in invalid[0].error
    assert "column 'prompt': 3 is not a string" in invalid[1].error
    assert "column 'width': nan is not an integer" in invalid[2].error


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "parquet"])
def test_plan_reads_every_format_and_carries_done_items(tmp_path: Path, suffix: str) -> None:
    frame = pd.DataFrame({"prompt": ["a cat", "a dog"], "seed": [1, 2], "extra": ["a", "b"]})
    dataset = tmp_path / f"prompts.{suffix}"
    {"jsonl": lambda p: frame.to_json(p, orient="records", lines=True),
     "csv": lambda p: frame.to_csv(p, index=False),
     "parquet": lambda p: frame.to_parquet(p)}[suffix](dataset)
    output = tmp_path / "out"
    plan = plan_items.fn(str(dataset), str(output), DEFAULTS, allow_unknown_columns=True)
    assert (len(plan.items), plan.num_rows, plan.carried) == (2, 2, [])
    assert [(i.seed, i.row) for i in plan.items] == [(1, 0), (2, 1)]

    store = open_store(output)
    store.put_bytes("videos/a.mp4", b"video")
    done = ItemResult(plan.items[0].item_id, ref=CheckpointRef(
        store.root_uri, "videos/a.mp4", hashlib.sha256(b"video").hexdigest()))
    shard = make_shards(plan.items[:1], 1)[0]
    write_manifest.fn(shard_rows(shard, {"write-video": [done]}, None), str(output))
    plan = plan_items.fn(str(dataset), str(output), DEFAULTS, allow_unknown_columns=True)
    assert [i.prompt for i in plan.items] == ["a dog"]
    assert [r["video_uri"] for r in plan.carried] == [store.uri("videos/a.mp4")]
    changed = SamplingParam(**{**DEFAULTS.__dict__, "num_inference_steps": 8})
    assert len(plan_items.fn(str(dataset), str(output), changed,
                             allow_unknown_columns=True).items) == 2


def test_dataset_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown format '.txt'"):
        plan_items.fn(str(tmp_path / "prompts.txt"), str(tmp_path), DEFAULTS)
    with pytest.raises(ValueError, match="does not exist"):
        plan_items.fn(str(tmp_path / "missing.jsonl"), str(tmp_path), DEFAULTS)


def test_cache_key_ignores_shard_index_and_dispatch_but_not_inputs() -> None:
    items, _ = parse_rows([{"prompt": "a cat"}, {"prompt": "a dog"}], DEFAULTS)
    context = SimpleNamespace(task=SimpleNamespace(name="denoise"))
    ref = CheckpointRef("file:///x", "checkpoints/t/1", "digest-1")
    first, second = make_shards(items, 1)

    def key(shard, digest="digest-1", mode="inprocess"):
        text = [ItemResult(shard.items[0].item_id, ref=CheckpointRef(ref.store_uri, ref.key, digest))]
        return shard_cache_key(context, {"shard": shard, "text": text,
                                         "dispatch": Dispatch(mode=mode)})

    moved = type(second)(index=7, items=second.items)
    assert key(second) == key(moved) == key(second, mode="torchrun")
    assert key(second) != key(first)
    assert key(second) != key(second, digest="digest-2")


def test_manifest_round_trip_and_labels(tmp_path: Path) -> None:
    items, _ = parse_rows([{"prompt": "a cat", "item_id": "cat"}], DEFAULTS)
    (shard,) = make_shards(items, 4)
    assert shard.label("decode") == "decode-shard-00000-cat"
    failed = ItemResult("cat", error="RuntimeError: boom", failed_stage="decode")
    ok = ItemResult("cat", ref=CheckpointRef("file:///o", "checkpoints/denoise/1", "d"),
                    seconds=1.5, info={"resumed_from_step": 4})
    uri = write_manifest.fn(shard_rows(shard, {"denoise": [ok], "decode": [failed]}, None),
                            str(tmp_path))
    (row,) = read_manifest(open_store(tmp_path))
    assert uri.endswith("/manifest.parquet")
    assert (row["status"], row["failed_stage"], row["resumed_from_step"]) == \
        ("failed", "decode", 4)
    assert row["denoise_checkpoint_uri"] == "file:///o/checkpoints/denoise/1"
    assert row["denoise_seconds"] == 1.5 and row["video_uri"] is None
    with pytest.raises(ValueError, match=r"dispatch must be one of \[.inprocess., .worker., .torchrun., .deployment.\], got .slurm."):
        Dispatch(mode="slurm")


class _ShardFuture:
    """A `generate-shard` future that a test's worker thread finishes, as Prefect's
    `as_completed` waits on one."""

    def __init__(self, shard) -> None:
        self.shard = shard
        self._final_state = None
        self._callbacks: list = []
        self._lock = threading.Lock()
        self._done = threading.Event()

    @property
    def state(self):
        return self._final_state

    def wait(self) -> None:
        self._done.wait()

    def add_done_callback(self, callback) -> None:
        with self._lock:
            if self._final_state is None:
                self._callbacks.append(callback)
                return
        callback(self)

    def finish(self) -> None:
        with self._lock:
            self._final_state = SimpleNamespace(name="Completed", result=lambda **_: {
                "write-video": [ItemResult(item_id=i.item_id) for i in self.shard.items]})
            callbacks, self._callbacks = self._callbacks, []
        self._done.set()
        for callback in callbacks:
            callback(self)


@pytest.mark.parametrize("concurrency", [1, 2])
def test_a_warm_worker_gets_the_next_shard_when_any_shard_ends(
        monkeypatch: pytest.MonkeyPatch, concurrency: int) -> None:
    """Shards reach the worker in any order. When the oldest one is still running (here
    shard 0, served last), the shards after it must end and be replaced at once: waiting
    for the oldest left the worker's GPU idle between shards."""
    import flows.pipeline as pipeline

    items, _ = parse_rows([{"prompt": f"prompt {i}"} for i in range(8)], DEFAULTS)
    shards = make_shards(items, 1)
    futures: list[_ShardFuture] = []
    oldest_running_at_submit: list[bool] = []

    def submit(shard, ctx, dispatch) -> _ShardFuture:
        oldest_running_at_submit.append(bool(futures) and futures[0].state is None)
        futures.append(_ShardFuture(shard))
        return futures[-1]

    def worker() -> None:  # serves every shard but the oldest, then the oldest
        late = time.monotonic() + 3  # a flow that waits for the oldest gets it late
        while len(futures) < len(shards) or any(f.state is None for f in futures):
            ready = [f for f in futures[1:] if f.state is None]
            if ready:
                ready[0].finish()
            elif futures and futures[0].state is None and (len(futures) == len(shards)
                                                or time.monotonic() > late):
                futures[0].finish()
            time.sleep(0.005)

    monkeypatch.setattr(pipeline.generate_shard, "submit", submit)
    threading.Thread(target=worker, daemon=True).start()
    done = [shard.index for shard, results in pipeline.process_remote(
        shards, None, None, concurrency)]
    limit = 2 * concurrency + 1
    assert [f.shard.index for f in futures] == list(range(8))
    assert oldest_running_at_submit[limit:] == [True] * (8 - limit)
    assert done == [*range(1, 8), 0]
