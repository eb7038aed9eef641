"""End-to-end check of the engine on GPUs: our WanPipeline against diffusers' on the same
tiny checkpoint and seed (bf16 DiT/text encoder, fp32 VAE, as the Wan reference runs), and
`VideoGenerator(num_gpus=N)` (sequence parallel over N worker processes) against one process,
`num_gpus=N, sp_size=1` (N replicas splitting a list of prompts) against one process, and
guidance as one batch of 2 (`batch_cfg`, the default) against two forwards per step; and
our WanImageToVideoPipeline against diffusers' on a tiny I2V checkpoint, in one process and
sequence parallel over N.

    python benchmarks/check_gpu_pipeline.py --num-gpus 2 --json-out result.json
    python benchmarks/check_gpu_pipeline.py --device cpu --dtype fp32 --num-gpus 2   # CPU, gloo
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from fastvideo import VideoGenerator
from fastvideo.fastvideo_args import parse_dtype
from fastvideo.testing.tiny_wan import make_tiny_wan

REQUEST = dict(prompt="a red fox running through fresh snow", negative_prompt="blurry",
               height=64, width=96, num_frames=9, num_inference_steps=8, guidance_scale=5.0)


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def diffusers_run(path: Path, device: str, dtype: torch.dtype, seed: int):
    from diffusers import AutoencoderKLWan, WanPipeline

    vae = AutoencoderKLWan.from_pretrained(path, subfolder="vae", dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(path, vae=vae, dtype=dtype).to(device)
    captured = {}

    def keep(pipe, step, t, kwargs):
        captured["latents"] = kwargs["latents"]
        return kwargs

    frames = pipe(**REQUEST, generator=torch.Generator().manual_seed(seed), output_type="np",
                  callback_on_step_end=keep).frames[0]
    return captured["latents"][0].float().cpu(), torch.from_numpy(frames)


def diffusers_i2v_run(path: Path, device: str, dtype: torch.dtype, seed: int, image):
    import types

    import diffusers.pipelines.wan.pipeline_wan_i2v as reference
    from diffusers import AutoencoderKLWan, WanImageToVideoPipeline

    if not hasattr(reference, "ftfy"):  # called unconditionally; identity for ASCII prompts
        reference.ftfy = types.SimpleNamespace(fix_text=lambda text: text)
    vae = AutoencoderKLWan.from_pretrained(path, subfolder="vae", dtype=torch.float32)
    pipe = WanImageToVideoPipeline.from_pretrained(path, vae=vae, dtype=dtype).to(device)
    captured = {}

    def keep(pipe, step, t, kwargs):
        captured["latents"] = kwargs["latents"]
        return kwargs

    frames = pipe(image=image, **REQUEST, generator=torch.Generator().manual_seed(seed),
                  output_type="np", callback_on_step_end=keep).frames[0]
    return captured["latents"][0].float().cpu(), torch.from_numpy(frames)


def check_i2v(tmp: Path, args: argparse.Namespace, dtype: torch.dtype) -> dict:
    """Image-to-video: ours against diffusers, and sequence parallel against one process."""
    import numpy as np
    from PIL import Image

    from fastvideo.testing.tiny_wan import TinyWanConfig

    path = make_tiny_wan(tmp / "tiny-wan-i2v", TinyWanConfig(kind="i2v"))
    rng = np.random.default_rng(args.seed)
    image = Image.fromarray(rng.integers(0, 256, (72, 104, 3), dtype=np.uint8))
    ref_latents, ref_frames = diffusers_i2v_run(path, args.device, dtype, args.seed, image)
    one = VideoGenerator.from_pretrained(path, device=args.device, dtype=args.dtype)
    start = time.perf_counter()
    ours = one.generate_video(**REQUEST, seed=args.seed, image=image)
    result = {"one_process_s": time.perf_counter() - start,
              "vs_diffusers": {"latents_rel_l2": _rel_l2(ours.latents, ref_latents),
                               "frames_max_abs": (ours.frames - ref_frames).abs().max().item()}}
    with VideoGenerator.from_pretrained(path, device=args.device, dtype=args.dtype,
                                        num_gpus=args.num_gpus) as many:
        sharded = many.generate_video(**REQUEST, seed=args.seed, image=image)
    result[f"sp{args.num_gpus}_vs_one_process"] = {
        "latents_rel_l2": _rel_l2(sharded.latents, ours.latents),
        "frames_max_abs": (sharded.frames - ours.frames).abs().max().item()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--num-gpus", type=int, default=2)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--kinds", default="t2v,i2v", help="t2v, i2v or both")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    kinds = set(args.kinds.split(","))
    dtype = parse_dtype(args.dtype)
    result: dict = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                    "dtype": str(dtype), "request": REQUEST}
    with tempfile.TemporaryDirectory() as tmp:
        if "i2v" in kinds:
            result["i2v"] = check_i2v(Path(tmp), args, dtype)
        if "t2v" not in kinds:
            print(json.dumps(result, indent=2))
            return
        path = make_tiny_wan(Path(tmp) / "tiny-wan")
        ref_latents, ref_frames = diffusers_run(path, args.device, dtype, args.seed)
        one = VideoGenerator.from_pretrained(path, device=args.device, dtype=args.dtype)
        start = time.perf_counter()
        ours = one.generate_video(**REQUEST, seed=args.seed)
        result["one_process_s"] = time.perf_counter() - start
        result["vs_diffusers"] = {
            "latents_rel_l2": _rel_l2(ours.latents, ref_latents),
            "frames_max_abs": (ours.frames - ref_frames).abs().max().item()}
        with VideoGenerator.from_pretrained(path, device=args.device, dtype=args.dtype,
                                            num_gpus=args.num_gpus) as many:
            start = time.perf_counter()
            sharded = many.generate_video(**REQUEST, seed=args.seed)
            result["n_processes_s"] = time.perf_counter() - start
        result[f"sp{args.num_gpus}_vs_one_process"] = {
            "latents_rel_l2": _rel_l2(sharded.latents, ours.latents),
            "latents_max_abs": (sharded.latents - ours.latents).abs().max().item(),
            "frames_max_abs": (sharded.frames - ours.frames).abs().max().item()}

        separate = VideoGenerator.from_pretrained(path, device=args.device, dtype=args.dtype,
                                                  batch_cfg=False)
        unbatched = separate.generate_video(**REQUEST, seed=args.seed)
        result["batch_cfg_vs_two_forwards"] = {
            "latents_rel_l2": _rel_l2(ours.latents, unbatched.latents),
            "frames_max_abs": (ours.frames - unbatched.frames).abs().max().item()}

        prompts = [f"{REQUEST['prompt']}, take {i}" for i in range(args.num_gpus + 1)]
        request = {k: v for k, v in REQUEST.items() if k != "prompt"}
        singles = one.generate_video(prompts, **request, seed=args.seed)
        with VideoGenerator.from_pretrained(path, device=args.device, dtype=args.dtype,
                                            num_gpus=args.num_gpus, sp_size=1) as replicas:
            split = replicas.generate_video(prompts, **request, seed=args.seed)
        result[f"{args.num_gpus}_replicas_vs_one_process"] = {
            "prompts_in_order": [r.prompt for r in split] == prompts,
            "latents_max_abs": max((a.latents - b.latents).abs().max().item()
                                   for a, b in zip(split, singles)),
            "frames_max_abs": max((a.frames - b.frames).abs().max().item()
                                  for a, b in zip(split, singles))}
    print(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
