"""Bulk generation on one GPU, as a user runs it: a plain diffusers `WanPipeline` loop over N
prompts against `python -m flows.bulk` on a warm worker (embedded Prefect server, local
store) over the same prompts, dense compiled and with sliding tile attention.

    python benchmarks/bench_bulk.py --model-path DIR --num-prompts 6 \
        --phases diffusers,dense,fresh,sta,fresh_sta --json-out bulk.json
    python benchmarks/bench_bulk.py --smoke --json-out bulk.json     # CPU, tiny model

Phases (each in its own processes, one after the other, the GPU freed in between):

* `diffusers`: load `WanPipeline` (bf16, fp32 VAE, as its reference runs), then for each
  prompt generate and write the mp4;
* `dense`: `flows.bulk --dispatch worker --compile` over the prompts, a fresh worker
  and an empty compile cache (the first video pays the compile);
* `fresh`: a new worker process over one more prompt with the cache `dense` left:
  what the first video costs a fresh process on a node that compiled before;
* `sta`: `dense` with sliding tile attention (25.7% of the keys, 10 dense steps first);
* `fresh_sta`: `fresh` with sliding tile attention, on the cache `sta` left.

Per phase: videos/hour, steady-state seconds per video (between the first and last
video's completion), first-video latency (from the command's start), GPU busy fraction
(NVML, over the steady state), peak GPU memory, and the orchestration + checkpoint
seconds per item (the steady-state period of the GPU lane, which is the critical path,
minus the engine's own seconds in it: text encoding, latents, denoising).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from make_random_wan import add_video_options  # noqa: E402

from fastvideo.jobs.worker_client import (  # noqa: E402
    WORKER_DIR_ENV,
    call_socket,
    running_workers,
)
from fastvideo.utils.video_io import write_mp4  # noqa: E402

PROMPTS = [
    "a red fox running through fresh snow, golden hour",
    "a sailboat crossing a calm bay at sunrise, aerial view",
    "a street market in the rain at night, neon reflections",
    "a hummingbird hovering over a purple flower, slow motion",
    "waves crashing on black volcanic rocks under a grey sky",
    "a steam train crossing a stone bridge in autumn forest",
    "a chef flipping vegetables in a wok, close up, flames",
    "time-lapse of clouds over a mountain lake",
    "a child flying a kite on a windy beach",
    "city traffic at dusk seen from a rooftop",
]
PHASES = ("diffusers", "dense", "fresh", "sta", "fresh_sta")
"""In the order they run; `fresh` and `fresh_sta` need the cache `dense` and `sta` leave."""
NEGATIVE = "blurry, static, distorted, low quality"
# STA as measured in RESULTS.md: window (4, 3, 6) tiles of the auto tile at 480p keeps 25.7%
# of the keys; the first 10 of 50 steps attend densely.
STA_CONFIG = {"tile_size": "auto", "num_full_steps": 10, "default_window": [4, 3, 6]}


class GpuSampler:
    """NVML utilisation and memory every 100 ms (nothing without a GPU)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._nvml = pynvml
        except Exception:
            self._nvml = None

    def __enter__(self) -> GpuSampler:
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            util = self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu
            used = self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used
            self.samples.append((time.time(), util, used))
            time.sleep(0.1)

    def busy(self, start: float, end: float) -> float | None:
        """Mean NVML utilisation (share of time a kernel ran) between `start` and `end`."""
        inside = [u for t, u, _ in self.samples if start <= t <= end]
        return round(statistics.mean(inside) / 100, 3) if inside else None

    def peak_gib(self) -> float | None:
        return round(max(m for _, _, m in self.samples) / 2**30, 2) if self.samples else None


def summarise(t0: float, done_at: list[float], cycles: list[float], sampler: GpuSampler,
              steady_from: float) -> dict[str, Any]:
    """The figures of a phase from the command's start `t0`, each video's completion, and
    the steady-state seconds per video `cycles` (measured from `steady_from` on)."""
    done_at = sorted(done_at)
    steady = statistics.mean(cycles) if cycles else None
    return {
        "videos": len(done_at), "first_video_s": round(done_at[0] - t0, 2),
        "total_s": round(done_at[-1] - t0, 2),
        "steady_s_per_video": round(steady, 2) if steady else None,
        "videos_per_hour": round(3600 / steady, 1) if steady else None,
        "gpu_busy_fraction": sampler.busy(steady_from, done_at[-1]) if steady else None,
        "nvml_peak_memory_gib": sampler.peak_gib(),
    }


def run_diffusers(args: argparse.Namespace, prompts: list[str], out: Path) -> dict[str, Any]:
    from diffusers import AutoencoderKLWan, WanPipeline

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    with GpuSampler() as sampler:
        t0 = time.time()
        vae = AutoencoderKLWan.from_pretrained(args.model_path, subfolder="vae",
                                               torch_dtype=torch.float32)
        pipe = WanPipeline.from_pretrained(args.model_path, vae=vae,
                                           torch_dtype=dtype).to(args.device)
        load_s = time.time() - t0
        done_at, engine_s = [], []
        for i, prompt in enumerate(prompts):
            start = time.time()
            frames = pipe(prompt=prompt, negative_prompt=NEGATIVE, height=args.height,
                          width=args.width, num_frames=args.num_frames,
                          num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                          generator=torch.Generator().manual_seed(i), output_type="pt").frames[0]
            engine_s.append(time.time() - start)
            write_mp4(frames.permute(0, 2, 3, 1).float().cpu(), out / f"{i}.mp4", fps=16)
            done_at.append(time.time())
            print(f"diffusers video {i}: {done_at[-1] - start:.2f} s "
                  f"(load {load_s:.1f} s, since start {done_at[-1] - t0:.1f} s)", flush=True)
    # Each video is whole before the next starts: the steady state is video 2 onwards.
    cycles = [b - a for a, b in zip(done_at, done_at[1:])]
    result = summarise(t0, done_at, cycles, sampler, done_at[0])
    result["load_s"] = round(load_s, 2)
    result["seconds_per_video"] = [round(b - a, 2) for a, b in
                                   zip([t0 + load_s, *done_at[:-1]], done_at)]
    if args.device.startswith("cuda"):
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del pipe, vae
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result


def run_flow(args: argparse.Namespace, name: str, prompts: list[str], options: list[str],
             workdir: Path, worker_dir: Path) -> dict[str, Any]:
    """`python -m flows.bulk` over `prompts` on a warm worker in `worker_dir`."""
    from fastvideo.storage import open_store
    from tasks.manifest import read_manifest

    dataset = workdir / f"{name}.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": p, "seed": i}) + "\n"
                               for i, p in enumerate(prompts)))
    output = workdir / name
    # Each run from an empty output: a rerun on the same machine would find its videos
    # made and measure nothing (the compile cache is elsewhere and stays).
    shutil.rmtree(output, ignore_errors=True)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, WORKER_DIR_ENV: str(worker_dir), "PYTHONPATH": path,
           "PREFECT_HOME": str(workdir / "prefect-home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "flows.bulk", "--dataset", str(dataset), "--output",
           str(output), "--model-path", args.model_path, "--dispatch", "worker",
           "--device", args.device, "--height", str(args.height), "--width", str(args.width),
           "--num-frames", str(args.num_frames), "--num-inference-steps", str(args.steps),
           "--guidance-scale", str(args.guidance_scale), "--negative-prompt", NEGATIVE,
           "--shard-size", str(args.shard_size), "--checkpoint-every",
           str(args.checkpoint_every), *options]
    with GpuSampler() as sampler:
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.time() - t0
    log = workdir / f"{name}.log"
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"flows.bulk ({name}) failed; end of its log:\n"
                           f"{(proc.stdout + proc.stderr)[-4000:]}")
    ((_, sock),) = running_workers(worker_dir).items()
    info = call_socket(sock, {"kind": "describe"})
    call_socket(sock, {"kind": "shutdown"})
    rows = read_manifest(open_store(str(output)))
    assert all(r["status"] == "succeeded" for r in rows), [r["error"] for r in rows]
    post = [e["end"] for e in info["timeline"] if e["lane"] == "post"]
    gpu = sorted((e for e in info["timeline"] if e["lane"] == "gpu"), key=lambda e: e["start"])
    by_id = {r["item_id"]: r for r in rows}
    # The GPU lane (text, latents, denoising) is the critical path: decoding and the mp4
    # of item k run beside item k+1's denoising. Its period from the second item on (the
    # first compiles) is the steady state; of that period, what is not the engine's own
    # compute is orchestration and checkpoints (store I/O, waiting for the next shard).
    starts = [e["start"] for e in gpu]
    cycles = [b - a for a, b in zip(starts[1:], starts[2:])] + [gpu[-1]["end"] - starts[-1]]
    # The GPU lane's phases: those up to denoising, included (the worker reports them).
    lane, denoise_column = [], None
    for phase in info["phases"]:
        lane.append(f"{phase['name'].replace('-', '_')}_seconds")
        if phase["denoise"]:
            denoise_column = lane[-1]
            break
    engine = [sum(by_id[e["item_id"]][c] for c in lane) for e in gpu[1:]]
    result = summarise(t0, post, cycles if len(gpu) > 1 else [], sampler,
                       starts[1] if len(gpu) > 1 else t0)
    if len(gpu) > 1:
        overhead = statistics.mean(c - e for c, e in zip(cycles, engine))
        result.update(engine_s_per_video=round(statistics.mean(engine), 2),
                      orchestration_checkpoint_s_per_video=round(overhead, 3),
                      orchestration_fraction=round(overhead / statistics.mean(cycles), 4))
    result.update(command_wall_s=round(wall, 2), worker_load_s=round(info["load_s"], 2),
                  # Wall clock of the command's start, to read the logs' times against.
                  started_at=datetime.fromtimestamp(t0).strftime("%H:%M:%S.%f")[:-3],
                  peak_memory_gib=info["peak_memory_gib"], compile_cache=info["compile_cache"],
                  compile_s=info["compile_s"], warm_up=info.get("warm_up"),
                  attention_backends=info["attention_backends"],
                  post_lane_s_per_video=round(statistics.mean(
                      e["end"] - e["start"] for e in info["timeline"] if e["lane"] == "post"), 2),
                  denoise_s_per_video=[round(by_id[e["item_id"]][denoise_column], 2)
                                       for e in gpu],
                  gpu_lane_idle_s=_gpu_lane_idle(gpu),
                  worker_start=_worker_start_lines(worker_dir),
                  timeline=[{**e, "start": round(e["start"] - t0, 3),
                             "end": round(e["end"] - t0, 3)} for e in info["timeline"]])
    return result


# The worker log's lines on its start and first item (warm_worker.py, engine.py,
# step_clock.py): where a fresh process's first video went, without reading the whole log.
_START_LINES = ("after its spawn", "on a thread", "load: ", "loaded in", "warm-up",
                "first denoise of this process", "torch.compile so far", "first call")


def _worker_start_lines(worker_dir: Path) -> list[str]:
    lines = []
    for log in sorted(worker_dir.glob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if any(mark in line for mark in _START_LINES):
                lines.append(line.split(" INFO ", 1)[-1][:300])
    return lines[:40]


def _gpu_lane_idle(spans: list[dict[str, Any]]) -> float:
    """Seconds the GPU lane waited between consecutive items (the flow, the store)."""
    spans = sorted(spans, key=lambda e: e["start"])
    return round(sum(max(0.0, b["start"] - a["end"]) for a, b in zip(spans, spans[1:])), 3)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path")
    parser.add_argument("--num-prompts", type=int, default=6)
    parser.add_argument("--phases", default="diffusers,dense,fresh,sta,fresh_sta")
    add_video_options(parser)
    parser.add_argument("--shard-size", type=int, default=1)
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true",
                        help="flows without --compile (the CPU smoke test: compiling is slow)")
    parser.add_argument("--workdir", type=Path, help="default: a temporary folder")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU: a tiny model and video through every phase")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    if args.smoke:
        args.device, args.height, args.width, args.num_frames, args.steps = "cpu", 32, 32, 5, 4
        args.num_prompts = min(args.num_prompts, 3)
        STA_CONFIG.update(num_full_steps=2, default_window=[1, 2, 2])
    elif not args.model_path:
        parser.error("--model-path is required (or --smoke)")
    return args


def main() -> None:
    args = parse_args()
    phases = args.phases.split(",")
    unknown = set(phases) - set(PHASES)
    if unknown:
        raise SystemExit(f"unknown phases {sorted(unknown)}; known: {', '.join(PHASES)}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-bulk-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.smoke and not args.model_path:
        from fastvideo.testing.tiny_wan import make_tiny_wan

        args.model_path = str(make_tiny_wan(workdir / "tiny-wan"))
    args.model_path = str(Path(args.model_path).resolve())
    prompts = PROMPTS[:args.num_prompts]
    sta_file = workdir / "sta.json"
    sta_file.write_text(json.dumps(STA_CONFIG))
    cache = workdir / "compile-cache"
    compile_opts = [] if args.no_compile else ["--compile", "--compile-cache-dir", str(cache)]
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "workload": {"height": args.height, "width": args.width, "num_frames": args.num_frames,
                     "steps": args.steps, "guidance_scale": args.guidance_scale,
                     "num_prompts": len(prompts), "shard_size": args.shard_size,
                     "checkpoint_every": args.checkpoint_every, "sta": STA_CONFIG},
        "phases": {}}
    # Phases run in separate calls (a device call is limited) add up in the workdir.
    cumulative = workdir / "bench.json"
    if cumulative.is_file():
        result["phases"] = json.loads(cumulative.read_text())["phases"]

    def save() -> None:
        base = result["phases"].get("diffusers", {}).get("steady_s_per_video")
        for phase in result["phases"].values():
            if base and phase.get("steady_s_per_video"):
                phase["speedup_vs_diffusers"] = round(base / phase["steady_s_per_video"], 3)
        for path in (cumulative, args.json_out):
            if path:
                path.write_text(json.dumps(result, indent=2))

    def record(name: str, value: dict[str, Any]) -> None:
        result["phases"][name] = value
        print(f"{name}: {json.dumps({k: v for k, v in value.items() if k != 'timeline'})}",
              flush=True)
        save()

    if "diffusers" in phases:
        (workdir / "diffusers").mkdir(exist_ok=True)
        record("diffusers", run_diffusers(args, prompts, workdir / "diffusers"))
    if "dense" in phases:
        record("dense", run_flow(args, "dense", prompts, compile_opts, workdir,
                                 workdir / "workers-dense"))
    more = PROMPTS[len(prompts):len(prompts) + 1] or PROMPTS[:1]
    sta_opts = [*compile_opts, "--sta-config", str(sta_file)]
    if "fresh" in phases:
        record("fresh", run_flow(args, "fresh", more, compile_opts, workdir,
                                 workdir / "workers-fresh"))
    if "sta" in phases:
        record("sta", run_flow(args, "sta", prompts, sta_opts, workdir, workdir / "workers-sta"))
    if "fresh_sta" in phases:
        record("fresh_sta", run_flow(args, "fresh_sta", more, sta_opts, workdir,
                                     workdir / "workers-fresh_sta"))
    save()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
