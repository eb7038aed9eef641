"""Where one whole denoise's time goes in the engine's loop, built as a warm worker builds
it: the time of each step (CUDA events at every step's end, no sync in the loop), then
a window of its steps under `torch.profiler` (the last dense steps and the first sparse
ones by default: a whole loop is too many events): GPU kernel time by kind, the GPU's
idle time and its largest gaps. Progress snapshots are taken every `--checkpoint-every`
steps and encoded on another thread, as the worker does.

    python benchmarks/profile_denoise.py --model-path /tmp/wan --compile \
        --compile-cache-dir /tmp/bench/compile-cache [--sta-config sta.json] --json-out p.json
    python benchmarks/profile_denoise.py --smoke --json-out p.json   # CPU, the tiny model

It answers what the steady state of a bulk run leaves unexplained: a denoise takes longer
than its forwards measured alone (`profile_dit.py`, `bench_decode_overlap.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from bench_dit import covered_us, idle_gaps  # the script's folder is on sys.path
from profile_dit import kind_of
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastvideo.fastvideo_args import SamplingParam  # noqa: E402
from fastvideo.forward_batch import ForwardBatch  # noqa: E402
from fastvideo.jobs.engine import ENGINE  # noqa: E402
from fastvideo.jobs.items import ItemSpec  # noqa: E402
from fastvideo.jobs.options import EngineOptions  # noqa: E402
from fastvideo.models.schedulers.sync_free import count_host_syncs  # noqa: E402
from fastvideo.storage.batch_codec import encode_batch, snapshot_fields  # noqa: E402

PROGRESS_FIELDS = ("latents", "step_index", "extra")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--compile-cache-dir")
    parser.add_argument("--sta-config", type=Path, help="an STA window file (JSON)")
    parser.add_argument("--batch-cfg", dest="batch_cfg", action="store_true", default=None,
                        help="the guidance branches as one pair (default: the engine's "
                             "choice, a pair under sequence parallelism only)")
    parser.add_argument("--no-batch-cfg", dest="batch_cfg", action="store_false", default=None,
                        help="the guidance branches as two forwards")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--num-frames", type=int, default=81)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--profile-from", type=int,
                        help="first profiled step (default: 2 before the first sparse one, "
                             "or 0 without STA)")
    parser.add_argument("--profile-steps", type=int, default=6)
    parser.add_argument("--smoke", action="store_true",
                        help="the tiny Wan model on CPU, a small video (a test of the script)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    if args.smoke:
        from fastvideo.testing.tiny_wan import make_tiny_wan

        args.model_path = make_tiny_wan(Path(tempfile.mkdtemp(prefix="profile-denoise-")))
        args.device, args.height, args.width, args.num_frames, args.steps = "cpu", 32, 32, 5, 4
        args.checkpoint_every = 2
    if args.model_path is None:
        parser.error("--model-path is required (or --smoke)")
    return args


def prepared(pipeline: Any, params: SamplingParam) -> tuple[Any, ForwardBatch]:
    """The denoising stage and the batch the phases before it make for one item."""
    batch = ItemSpec(item_id="profile", prompt="a chef flipping vegetables in a wok",
                     shared_negative=False, params=params).to_batch(ForwardBatch())
    args = pipeline.fastvideo_args
    with torch.no_grad():
        for phase in pipeline.phases:
            if phase.denoise:
                return pipeline.get_stage(phase.stages[0]), batch
            for name in phase.stages:
                batch = pipeline.get_stage(name)(batch, args)
    raise ValueError("the pipeline has no denoise phase")


def denoise(stage: Any, batch: ForwardBatch, args: Any, checkpoint_every: int,
            uploads: ThreadPoolExecutor, marks: list[Any] | None = None,
            profiler: Any = None, window: range = range(0),
            syncs: list[int] | None = None) -> float:
    """One whole loop on a copy of `batch`, progress snapshots as the worker takes them;
    `marks` gets a CUDA event (CPU: a time) at every step's end; `profiler` runs over the
    steps in `window`; `syncs` (CUDA) gets, at every step's end, how many times the host
    has waited for the GPU so far (`torch.cuda.set_sync_debug_mode`). Returns wall
    seconds."""
    cuda = args.device.startswith("cuda")
    pending = []
    profiling = [False]
    counting = syncs is not None and cuda
    count = [lambda: 0]  # the counter of the block below, once entered

    def on_step_end(current: ForwardBatch, step: int, total: int) -> None:
        if counting:
            syncs.append(count[0]())
        if profiler is not None and step == window.start and not profiling[0]:
            profiler.start()
            profiling[0] = True
        elif profiler is not None and step == window.stop and profiling[0]:
            profiler.stop()
            profiling[0] = False
        if step % checkpoint_every == 0 and step < total:
            snapshot, ready = snapshot_fields(current, PROGRESS_FIELDS)
            pending.append(uploads.submit(lambda: (ready(), encode_batch(snapshot,
                                                                         PROGRESS_FIELDS))))
        if marks is not None:
            if cuda:
                marks.append(torch.cuda.Event(enable_timing=True))
                marks[-1].record()
            else:
                marks.append(time.perf_counter())

    work = copy.copy(batch)
    work.extra = dict(batch.extra)
    stage.on_step_end = on_step_end
    if marks is not None or (profiler is not None and window.start == 0):
        on_step_end(work, 0, 0)  # the loop's start
    start = time.perf_counter()
    counter = count_host_syncs() if counting else contextlib.nullcontext(count[0])
    with torch.no_grad(), counter as syncs_so_far:
        count[0] = syncs_so_far
        stage(work, args)
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    if profiling[0]:
        profiler.stop()
    stage.on_step_end = None
    for future in pending:
        future.result()
    return wall


def step_ms(marks: list[Any], cuda: bool) -> list[float]:
    if cuda:
        return [a.elapsed_time(b) for a, b in zip(marks, marks[1:])]
    return [(b - a) * 1e3 for a, b in zip(marks, marks[1:])]


def main() -> None:
    args = parse_args()
    options = EngineOptions(
        enable_torch_compile=args.compile, batch_cfg=args.batch_cfg,
        compile_cache_dir=args.compile_cache_dir,
        sta_config=args.sta_config.read_text() if args.sta_config else None)
    pipeline = ENGINE.options_pipeline(str(args.model_path.resolve()), options, args.device,
                                       args.dtype)
    fv_args = pipeline.fastvideo_args
    params = SamplingParam(height=args.height, width=args.width, num_frames=args.num_frames,
                           num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                           negative_prompt="")
    stage, batch = prepared(pipeline, params)
    cuda = fv_args.device.startswith("cuda")
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "video": [args.num_frames, args.height, args.width], "steps": args.steps,
        "compile": args.compile, "sta": args.sta_config is not None,
        "batch_cfg": fv_args.batch_cfg}
    with ThreadPoolExecutor(1, thread_name_prefix="uploads") as uploads:
        # The first loop (it compiles) also counts the host's waits for the GPU per step:
        # any at a step's boundary leaves the next step's first kernels on an idle GPU.
        syncs: list[int] = []
        result["first_loop_s"] = round(denoise(stage, batch, fv_args, args.checkpoint_every,
                                               uploads, syncs=syncs), 3)
        if cuda and len(syncs) > 3:
            per_step = [b - a for a, b in zip(syncs, syncs[1:])]
            result["host_syncs_per_step_after_step_2"] = round(
                statistics.mean(per_step[2:]), 2)
        marks: list[Any] = []
        result["loop_s"] = round(denoise(stage, batch, fv_args, args.checkpoint_every,
                                         uploads, marks), 3)
        steps = step_ms(marks, cuda)
        dense = stage.sta_config.num_full_steps if stage.sta_config is not None else len(steps)
        result["step_ms"] = [round(ms, 2) for ms in steps]
        result["dense_step_ms_median"] = round(statistics.median(steps[:dense]), 2)
        if dense < len(steps):
            result["sparse_step_ms_median"] = round(statistics.median(steps[dense:]), 2)
        first = (args.profile_from if args.profile_from is not None
                 else max(dense - 2, 0) if dense < len(steps) else 0)
        window = range(first, min(first + args.profile_steps, args.steps))
        result["profiled_steps"] = [window.start, window.stop]
        prof = profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU])
        result["profiled_loop_s"] = round(denoise(stage, batch, fv_args, args.checkpoint_every,
                                                  uploads, profiler=prof, window=window), 3)
    events = [e for e in prof.events() if e.device_type.name == "CUDA"] if cuda else []
    spans = [(e.time_range.start, e.time_range.end, e.name) for e in events]
    by_kind: dict[str, float] = defaultdict(float)
    by_name: dict[str, float] = defaultdict(float)
    for start, end, name in spans:
        by_kind[kind_of(name)] += (end - start) / 1e3
        by_name[name] += (end - start) / 1e3
    busy_ms = covered_us((s, e) for s, e, _ in spans) / 1e3
    span_ms = ((max(e for _, e, _ in spans) - min(s for s, _, _ in spans)) / 1e3
               if spans else 0.0)
    gaps = [(us / 1e3, before, after) for us, before, after in idle_gaps(spans)]
    result.update(
        gpu_kernel_ms_by_kind={k: round(v, 1) for k, v in sorted(by_kind.items())},
        gpu_busy_ms=round(busy_ms, 1), gpu_span_ms=round(span_ms, 1),
        gpu_idle_ms=round(span_ms - busy_ms, 1),
        gpu_gaps_over_1ms=sum(1 for ms, _, _ in gaps if ms > 1.0),
        largest_gaps=[{"ms": round(ms, 2), "after": before[:80], "before": after[:80]}
                      for ms, before, after in gaps[:15]],
        top_kernels_ms=[[name[:100], round(ms, 1)] for name, ms in
                        sorted(by_name.items(), key=lambda kv: -kv[1])[:25]])
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text)


if __name__ == "__main__":
    main()
