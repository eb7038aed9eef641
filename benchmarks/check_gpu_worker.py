"""The warm worker's shard runner on a GPU, without Prefect: every stage of a few items of a
tiny model with the lanes overlapped (decoding on its own CUDA stream) against the lanes in
turn, and the difference between their outputs; a progress checkpoint's snapshot
(`snapshot_fields`: device tensors copied without waiting) against encoding right away,
with the GPU overwriting the tensors just after the snapshot; weights moved on threads and
modules built ahead (`Engine.preload`) against plain loads; frames rounded on the GPU
against rounding on the host.

    python benchmarks/check_gpu_worker.py --json-out result.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastvideo.fastvideo_args import SamplingParam  # noqa: E402
from fastvideo.forward_batch import ForwardBatch  # noqa: E402
from fastvideo.jobs.item_phases import WRITE_VIDEO  # noqa: E402
from fastvideo.jobs.items import ItemSpec, RunContext, Shard  # noqa: E402
from fastvideo.jobs.shard_runner import ShardRunner  # noqa: E402
from fastvideo.jobs.video_stream import STREAM_VIDEO_ENV  # noqa: E402
from fastvideo.storage import open_store, read_checkpoint  # noqa: E402
from fastvideo.storage.batch_codec import encode_batch, snapshot_fields  # noqa: E402
from fastvideo.testing.tiny_wan import make_tiny_wan  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="check-worker-"))
    model = make_tiny_wan(tmp / "tiny")
    items = tuple(ItemSpec(item_id=f"item{i}", prompt=f"a cat walks {i}", shared_negative=True,
                           params=SamplingParam(negative_prompt="blurry", seed=i, height=64,
                                                width=64, num_frames=9, num_inference_steps=8,
                                                guidance_scale=5.0, max_sequence_length=16))
                  for i in range(3))
    result: dict = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
    frames = {}
    for overlap in (True, False):
        # Overlapped, the videos are encoded while decoding (video_stream.py); in turn, after.
        os.environ[STREAM_VIDEO_ENV] = "1" if overlap else "0"
        store = tmp / f"overlap-{overlap}"
        ctx = RunContext(model_path=str(model), model_fingerprint=None, store_uri=str(store),
                         output_uri=str(store), device=args.device, dtype=args.dtype,
                         denoise_device=args.device, denoise_dtype=args.dtype,
                         negative_prompt="blurry", max_sequence_length=16, checkpoint_every=2)
        runner = ShardRunner(overlap=overlap)
        start = time.perf_counter()
        results = runner.run(ctx, Shard(index=0, items=items), lambda event: None)
        runner.close()
        assert all(r.ok for step in results.values() for r in step), results
        result[f"seconds_overlap_{overlap}"] = round(time.perf_counter() - start, 3)
        frames[overlap] = [read_checkpoint(open_store(str(store)), r.ref.key).output.float()
                           for r in results["decode"]]
        result[f"denoise_digests_{overlap}"] = [r.ref.digest for r in results["denoise"]]
        result[f"video_digests_{overlap}"] = [r.ref.digest for r in results[WRITE_VIDEO]]
    os.environ.pop(STREAM_VIDEO_ENV)
    result["videos_equal"] = result["video_digests_True"] == result["video_digests_False"]
    result["max_frame_diff"] = max((a - b).abs().max().item()
                                   for a, b in zip(frames[True], frames[False]))
    result["denoised_equal"] = result["denoise_digests_True"] == result["denoise_digests_False"]
    result["snapshot_equal"] = check_snapshot(args.device)
    result["threaded_move_equal"] = check_threaded_move(model / "text_encoder", args.device)
    result["staged_load_equal"] = check_staged_load(model, args.device, args.dtype)
    result["preload_equal"] = check_preload(model, args.device, args.dtype)
    result["uint8_on_device_equal"] = check_uint8_on_device(model, args.device)
    result["scheduler_syncs"] = check_scheduler_syncs(args.device)
    print(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))


def check_staged_load(model: Path, device: str, dtype: str) -> bool:
    """The DiT loaded with its tensors staged to the device on 8 threads equals it loaded
    with plain copies (`FASTVIDEO_LOAD_THREADS=1`)."""
    from fastvideo.fastvideo_args import FastVideoArgs
    from fastvideo.models.loader.component_loader import load_component, read_model_index
    from fastvideo.models.loader.transfer import LOAD_THREADS_ENV

    spec = read_model_index(model)["transformer"]
    args = FastVideoArgs(model_path=str(model), device=device, dtype=dtype)
    loaded = {}
    for threads in ("8", "1"):
        os.environ[LOAD_THREADS_ENV] = threads
        loaded[threads] = load_component("transformer", spec, model, args).state_dict()
    del os.environ[LOAD_THREADS_ENV]
    return all(torch.equal(loaded["8"][k], loaded["1"][k]) for k in loaded["1"])


def check_preload(model: Path, device: str, dtype: str) -> bool:
    """The text encoder and DiT built on `Engine.preload`'s thread equal those a pipeline
    loads itself."""
    from fastvideo.fastvideo_args import FastVideoArgs
    from fastvideo.jobs.engine import Engine

    args = FastVideoArgs(model_path=str(model), device=device, dtype=dtype)
    ahead = Engine()
    if ahead.preload(args) != ["text_encoder", "transformer"]:
        return False
    ours, plain = ahead.pipeline(args), Engine().pipeline(args)
    for name in ("text_encoder", "transformer"):
        a, b = ours.get_module(name).state_dict(), plain.get_module(name).state_dict()
        if not all(torch.equal(a[k], b[k]) for k in b):
            return False
    return True


def check_uint8_on_device(model: Path, device: str) -> bool:
    """The decoding stage's frames rounded to uint8 on the GPU (`frames_as_uint8`) equal its
    float frames rounded on the host."""
    from fastvideo.fastvideo_args import FastVideoArgs
    from fastvideo.jobs.engine import Engine
    from fastvideo.pipelines.stages.decoding import frames_as_uint8
    from fastvideo.utils.video_io import to_uint8

    args = FastVideoArgs(model_path=str(model), device=device)
    stage = Engine().pipeline(args, ["decoding_stage"]).get_stage("decoding_stage")
    latents = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = stage(ForwardBatch(latents=latents), args).output
    with frames_as_uint8():
        rounded = stage(ForwardBatch(latents=latents), args).output
    return rounded.dtype == torch.uint8 and torch.equal(rounded, to_uint8(plain))


def check_scheduler_syncs(device: str) -> dict:
    """Wan's UniPC over 50 steps at 480p's latent size with random predictions: how many
    times a step makes the host wait for the GPU (`torch.cuda.set_sync_debug_mode`): as
    diffusers runs it, with its noise levels on the device, and with those and the
    sync-free corrector (what the engine does); and how far the trajectories are apart."""
    from diffusers import UniPCMultistepScheduler

    from fastvideo.models.schedulers.sync_free import (
        count_host_syncs,
        keep_sigmas_on,
        use_sync_free_steps,
    )

    if not device.startswith("cuda"):
        return {"skipped": "not a CUDA device"}
    generator = torch.Generator(device).manual_seed(0)
    predictions = [torch.randn(1, 16, 21, 60, 104, device=device, generator=generator)
                   for _ in range(4)]
    runs = {}
    for where in ("cpu", "device", "engine"):
        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction",
                                            use_flow_sigmas=True, flow_shift=3.0)
        scheduler.set_timesteps(50, device=device)
        scheduler.set_begin_index(0)
        if where != "cpu":
            keep_sigmas_on(scheduler, device)
        if where == "engine":
            use_sync_free_steps(scheduler)
        latents = predictions[0].clone()
        torch.cuda.synchronize()
        with count_host_syncs() as syncs:
            for i, t in enumerate(scheduler.timesteps):
                latents = scheduler.step(predictions[i % 4], t, latents, return_dict=False)[0]
            runs[where] = (latents.float(), syncs() / len(scheduler.timesteps))
    return {"syncs_per_step_sigmas_on_cpu": runs["cpu"][1],
            "syncs_per_step_sigmas_on_device": runs["device"][1],
            "syncs_per_step_engine": runs["engine"][1],
            "max_abs_diff_device": (runs["cpu"][0] - runs["device"][0]).abs().max().item(),
            "engine_equals_device": torch.equal(runs["engine"][0], runs["device"][0]),
            "max_abs": runs["cpu"][0].abs().max().item()}


def check_threaded_move(folder: Path, device: str) -> bool:
    """A text encoder moved to the device on 8 threads (`to_device`) equals `.to(device)`,
    ties kept."""
    from transformers import UMT5EncoderModel

    from fastvideo.models.loader.transfer import to_device

    plain = UMT5EncoderModel.from_pretrained(folder).to(device)
    threaded = to_device(UMT5EncoderModel.from_pretrained(folder), device, threads=8)
    ours, reference = threaded.state_dict(), plain.state_dict()
    return (all(torch.equal(ours[k], reference[k]) for k in reference)
            and all(t.device.type == torch.device(device).type for t in ours.values())
            and (threaded.encoder.embed_tokens.weight is threaded.shared.weight)
            == (plain.encoder.embed_tokens.weight is plain.shared.weight))


def check_snapshot(device: str) -> bool:
    """A snapshot whose copies queue behind GPU work, followed by in-place writes to the
    same tensors, holds the values it was taken at."""
    torch.manual_seed(0)
    latents = torch.randn(1, 16, 21, 60, 104, device=device)
    output = torch.randn_like(latents)
    expected = (latents.cpu().clone(), output.cpu().clone())
    busy = torch.randn(4096, 4096, device=device)
    for _ in range(20):  # queued ahead of the snapshot's copies
        busy = busy @ busy / 64
    batch = ForwardBatch(latents=latents, step_index=5,
                         extra={"scheduler_state": {"model_outputs.0": output,
                                                    "model_outputs.__len__": 1}})
    snapshot, ready = snapshot_fields(batch, ("latents", "step_index", "extra"))
    latents.zero_()  # the loop goes on, writing into the same memory
    output.fill_(1.0)
    ready()
    encode_batch(snapshot, ("latents", "step_index", "extra"))
    return (torch.equal(snapshot.latents, expected[0])
            and torch.equal(snapshot.extra["scheduler_state"]["model_outputs.0"], expected[1]))


if __name__ == "__main__":
    main()
