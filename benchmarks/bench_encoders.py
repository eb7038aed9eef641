"""Our text encoders against transformers' on the same random weights and tokens, same process.

    python benchmarks/bench_encoders.py --json-out encoders.json                 # on a GPU
    python benchmarks/bench_encoders.py --tiny --device cpu --dtype fp32 --iters 1  # CPU smoke

UMT5-XXL's encoder (Wan's text encoder, 512 tokens), a Llama-3-8B-class `LlamaModel`
(HunyuanVideo's, 256 tokens, `hidden_states[-3]` read) and CLIP-L's text tower (77 tokens,
the pooled output read), batch 1. Transformers' model is built on the device in `--dtype`
with random weights (`make_random_wan.randomize_`; in fp16 T5's `wo` stays fp32, as
`from_pretrained` keeps it); ours gets its state dict through our weight loading, in memory
(`load_weights`) or, with `--via-folder DIR`, through the engine's loader from the folder
transformers' `save_pretrained` writes. One encoder at a time is on the device. Timed calls
alternate between the two after `--warmup` calls each; the median is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from bench_dit import time_once  # noqa: E402
from bench_hunyuan_dit import compare, load_ours, synchronize  # noqa: E402
from make_random_wan import randomize_  # noqa: E402

from fastvideo.fastvideo_args import parse_dtype  # noqa: E402

# name -> (transformers config class, model class, full config, tiny config, tokens, read)
ENCODERS: dict[str, dict[str, Any]] = {
    "umt5": dict(
        config="UMT5Config", model="UMT5EncoderModel", seq_len=512, read="last_hidden_state",
        # google/umt5-xxl's encoder, as Wan2.1 ships it.
        full=dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                  num_heads=64, relative_attention_num_buckets=32,
                  relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                  layer_norm_epsilon=1e-6, tie_word_embeddings=False),
        tiny=dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
                  relative_attention_num_buckets=8, relative_attention_max_distance=16,
                  feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
    "llama": dict(
        config="LlamaConfig", model="LlamaModel", seq_len=256, read="hidden_states[-3]",
        # Llama-3-8B (HunyuanVideo's llava-llama-3-8b text tower).
        full=dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                  max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0),
        tiny=dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  rope_theta=500000.0)),
    "clip": dict(
        config="CLIPTextConfig", model="CLIPTextModel", seq_len=77, read="pooler_output",
        # openai/clip-vit-large-patch14's text tower (legacy eos_token_id 2: pools at the
        # highest id, the end-of-text token).
        full=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                  num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                  hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=0,
                  eos_token_id=2, pad_token_id=1, projection_dim=768),
        tiny=dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=16, bos_token_id=0,
                  eos_token_id=2, pad_token_id=1)),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoders", default=",".join(ENCODERS),
                        help=f"comma-separated, from {', '.join(ENCODERS)}")
    parser.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke test)")
    parser.add_argument("--valid", type=int, default=120,
                        help="real tokens of the prompt (UMT5 and Llama; the rest is padding)")
    parser.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--via-folder", type=Path,
                        help="save transformers' model here and load ours through the engine's "
                             "loader (default: load_weights in memory)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    args.encoders = [e for e in args.encoders.split(",") if e]
    unknown = sorted(set(args.encoders) - set(ENCODERS))
    if unknown:
        parser.error(f"unknown encoders {unknown}; choose from {list(ENCODERS)}")
    return args


def build(name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype
          ) -> tuple[nn.Module, nn.Module, dict[str, float]]:
    import transformers

    spec = ENCODERS[name]
    sizes = spec["tiny" if args.tiny else "full"]
    config = getattr(transformers, spec["config"])(**sizes)
    begin = time.perf_counter()
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            reference = getattr(transformers, spec["model"])(config)
    finally:
        torch.set_default_dtype(default_dtype)
    reference.eval().requires_grad_(False)
    randomize_(reference, torch.Generator(device).manual_seed(args.seed))
    keep_fp32 = set(getattr(reference, "_keep_in_fp32_modules", None) or ())
    if dtype == torch.float16 and keep_fp32:
        for param_name, param in reference.named_parameters():
            if keep_fp32 & set(param_name.split(".")):
                param.data = param.data.float()
    synchronize(device)
    seconds = {"build_reference_s": time.perf_counter() - begin}
    begin = time.perf_counter()
    with contextlib.ExitStack() as stack:
        folder = None
        if args.via_folder is not None:
            args.via_folder.mkdir(parents=True, exist_ok=True)
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=args.via_folder)))
        from fastvideo.models.registry import resolve_model

        cls = resolve_model(spec["model"]).load_class()
        ours = load_ours(cls, reference, json.loads(reference.config.to_json_string()), device,
                         dtype, folder, spec["model"], "transformers")
        synchronize(device)
    seconds["load_ours_s"] = time.perf_counter() - begin
    return reference, ours, seconds


def make_inputs(name: str, config: Any, args: argparse.Namespace, device: torch.device
                ) -> dict[str, Any]:
    seq_len = ENCODERS[name]["seq_len"]
    if args.tiny:
        seq_len = min(seq_len, 16)
    generator = torch.Generator(device).manual_seed(args.seed + 1)
    vocab = config.vocab_size
    input_ids = torch.randint(3, vocab - 1, (1, seq_len), generator=generator, device=device)
    if name == "clip":
        # The prompt, its end-of-text (the highest id), then end-of-text padding, no mask:
        # as HunyuanVideo's pipeline calls CLIP.
        valid = min(args.valid, seq_len) // 2
        input_ids[:, valid:] = vocab - 1
        return {"input_ids": input_ids}
    valid = min(args.valid, seq_len)
    mask = torch.zeros(1, seq_len, dtype=torch.long, device=device)
    mask[:, :valid] = 1
    input_ids[:, valid:] = 0
    inputs = {"input_ids": input_ids, "attention_mask": mask}
    if name == "llama":
        inputs["output_hidden_states"] = True
    return inputs


def read(name: str, output: Any) -> torch.Tensor:
    what = ENCODERS[name]["read"]
    if what == "hidden_states[-3]":
        return output.hidden_states[-3]
    return getattr(output, what)


def bench_one(name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype
              ) -> dict[str, Any]:
    reference, ours, seconds = build(name, args, device, dtype)
    inputs = make_inputs(name, reference.config, args, device)
    runs = {"transformers": lambda: reference(**inputs),
            "ours": lambda: ours(inputs["input_ids"], inputs.get("attention_mask"),
                                 output_hidden_states=inputs.get("output_hidden_states", False))}
    times: dict[str, list[float]] = {run: [] for run in runs}
    with torch.inference_mode():
        outputs = {run: fn() for run, fn in runs.items()}
        for _ in range(args.warmup):
            for fn in runs.values():
                time_once(fn, device)
        for _ in range(args.iters):
            for run, fn in runs.items():
                times[run].append(time_once(fn, device))
    expected = read(name, outputs["transformers"]).float()
    actual = read(name, outputs["ours"]).float()
    last = compare(outputs["ours"].last_hidden_state.float(),
                   outputs["transformers"].last_hidden_state.float())
    median = {run: statistics.median(t) for run, t in times.items()}
    result = {
        "class": ENCODERS[name]["model"], "seq_len": inputs["input_ids"].shape[1],
        "valid_tokens": int(inputs["attention_mask"].sum()) if "attention_mask" in inputs
        else None, "params": sum(p.numel() for p in reference.parameters()),
        "attn_implementation": getattr(reference.config, "_attn_implementation", None),
        "median_ms": median, "all_ms": times,
        "ratio_ours_over_transformers": median["ours"] / median["transformers"],
        "compared": ENCODERS[name]["read"], **compare(actual, expected),
        "max_abs_output": expected.abs().max().item(),
        "last_hidden_state": last, **seconds,
    }
    print(f"{name:>6}: ours {median['ours']:8.2f} ms, transformers {median['transformers']:8.2f}"
          f" ms (ratio {result['ratio_ours_over_transformers']:.3f}); {result['compared']} max "
          f"|diff| {result['max_abs']:.3e}, rel L2 {result['rel_l2']:.3e} (max |output| "
          f"{result['max_abs_output']:.3f})", flush=True)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), parse_dtype(args.dtype)
    import transformers

    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "dtype": str(dtype), "tiny": args.tiny, "iters": args.iters, "warmup": args.warmup,
        "via_folder": args.via_folder is not None, "encoders": {},
    }
    for name in args.encoders:
        result["encoders"][name] = bench_one(name, args, device, dtype)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.json_out:  # after each encoder: a run cut short keeps what ended
            args.json_out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
