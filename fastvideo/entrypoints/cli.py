"""The `fastvideo` command: `generate` videos, `make-tiny-model` for tests and demos."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence

from fastvideo.fastvideo_args import FastVideoArgs, SamplingParam

# `make-tiny-model --kind` -> `TinyWanConfig.kind` (None: HunyuanVideo, its own builder)
_TINY_KINDS: dict[str, str | None] = {"wan-t2v": "t2v", "wan-i2v": "i2v", "hunyuan": None}
_ARG_TYPES: dict[str, type] = {"int": int, "float": float, "str": str}


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type, skip: set[str]) -> None:
    """One `--option-name` per dataclass field, typed from its default; help from the field."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        # Typed from the annotation: an optional field's default (None) names no type.
        arg_type = _ARG_TYPES.get(str(f.type).split(" | ")[0], str)
        # An unset number is the family's; an unset text (negative prompt) is none.
        shown = "none" if default is None and arg_type is str else "the model family's"
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=arg_type, default=None,
                            help=f"default: {shown}")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastvideo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate videos from prompts")
    gen.add_argument("--model-path", required=True, help="Diffusers-format model folder")
    gen.add_argument("--prompt", action="append", required=True,
                     help="prompt text; repeat for several videos")
    gen.add_argument("--output-path", required=True, help="folder for the mp4 files")
    gen.add_argument("--fps", type=int, default=None,
                     help="frames per second of the mp4 (default: the model family's)")
    gen.add_argument("--image", default=None,
                     help="image-to-video models: the first frame of every video, a local "
                          "path or a store URI (s3://bucket/a.png)")
    add_dataclass_options(gen, SamplingParam, skip={"image"})
    engine = gen.add_argument_group("engine options")
    engine.add_argument("--device", default=None)
    engine.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16")
    engine.add_argument("--num-gpus", type=int, default=1)
    engine.add_argument("--sp-size", type=int, default=None,
                        help="GPUs per model replica, the DiT sequence parallel over them "
                             "(default: --num-gpus). Fewer makes replicas, which split a "
                             "list of prompts in one call; this command makes one video per "
                             "call, so for replicas use VideoGenerator or flows.bulk")
    engine.add_argument("--tp-size", type=int, default=1)
    engine.add_argument("--attention-backend", default=None,
                        help="TORCH_SDPA, FLASH_ATTN or SLIDING_TILE_ATTN (default: per layer)")
    engine.add_argument("--sta-config", default=None,
                        help="sliding tile attention windows (JSON from "
                             "python -m fastvideo.entrypoints.sta_search); selects that backend")
    engine.add_argument("--enable-torch-compile", action="store_true", default=None,
                        help="compile the DiT's blocks (first video of each shape is slower)")
    engine.add_argument("--batch-cfg", dest="batch_cfg", action="store_true", default=None,
                        help="run guidance's conditional and unconditional forwards as one "
                             "batch of 2 (default: only under sequence parallelism)")
    engine.add_argument("--no-batch-cfg", dest="batch_cfg", action="store_false", default=None,
                        help="run guidance's conditional and unconditional forwards one after "
                             "the other (half the activations)")
    engine.add_argument("--step-cache-threshold", type=float, default=None, metavar="X",
                        help="skip DiT steps whose modulated input changed little, "
                             "TeaCache-style (default: off; see docs/attention_and_speed.md)")

    tiny = sub.add_parser("make-tiny-model",
                          help="write a tiny random-weight checkpoint (Diffusers format)")
    tiny.add_argument("--output", required=True, help="folder to write")
    tiny.add_argument("--kind", choices=sorted(_TINY_KINDS), default="wan-t2v",
                      help="wan-t2v: text-to-video (WanPipeline); wan-i2v: image-to-video "
                           "(WanImageToVideoPipeline, with a CLIP image encoder); hunyuan: "
                           "HunyuanVideo text-to-video (HunyuanVideoPipeline)")
    tiny.add_argument("--scheduler", choices=["unipc", "euler"], default="unipc",
                      help="Wan only (HunyuanVideo's is flow-match Euler)")
    tiny.add_argument("--seed", type=int, default=0)
    return parser


def _generate(args: argparse.Namespace) -> int:
    from fastvideo.entrypoints.video_generator import VideoGenerator

    engine_fields = {f.name for f in dataclasses.fields(FastVideoArgs)} - {"model_path"}
    engine = {k: v for k, v in vars(args).items() if k in engine_fields and v is not None}
    sampling = {k: v for k, v in vars(args).items()
                if k in SamplingParam.option_names() and v is not None}
    negative = sampling.pop("negative_prompt", None)
    generator = VideoGenerator.from_pretrained(args.model_path, **engine)
    for prompt in args.prompt:
        result = generator.generate_video(prompt, negative_prompt=negative,
                                          output_path=args.output_path, fps=args.fps, **sampling)
        total = sum(result.timings.values())
        print(f"{result.video_path}  ({total:.1f} s)")
    return 0


def _make_tiny_model(args: argparse.Namespace) -> int:
    from fastvideo.testing.tiny_hunyuan import TinyHunyuanConfig, make_tiny_hunyuan
    from fastvideo.testing.tiny_wan import TinyWanConfig, make_tiny_wan

    kind = _TINY_KINDS[args.kind]
    if kind is None:
        path = make_tiny_hunyuan(args.output, TinyHunyuanConfig(seed=args.seed))
        print(f"wrote a tiny HunyuanVideo checkpoint to {path}")
        return 0
    path = make_tiny_wan(args.output,
                         TinyWanConfig(kind=kind, scheduler=args.scheduler, seed=args.seed))
    print(f"wrote a tiny Wan2.1 {kind.upper()} checkpoint to {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
        return _make_tiny_model(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
