"""Prompt adherence of videos already made: the shapes scorer on each finished video of a bulk
run (its `manifest.parquet`), or on video files given with their prompts.

    python -m fastvideo.training.score_videos outputs/demo          # what `make demo` prints
    python -m fastvideo.training.score_videos --video a.mp4 --prompt "a red circle moves up on a blue background"

Rows whose prompt is not a shapes caption ("a <colour> <shape> moves <direction> on a
<colour> background") are listed as not scored; they do not count.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fastvideo.training.scorer import ATTRIBUTES, Detection, compare, detect
from fastvideo.training.shapes_data import Attributes, parse_caption


@dataclass(frozen=True)
class ScoredVideo:
    prompt: str
    video: str
    wanted: Attributes | None
    """None: the prompt is not a shapes caption."""
    found: Detection | None

    @property
    def right(self) -> dict[str, bool]:
        if self.wanted is None or self.found is None:
            return {}
        return compare(self.found, self.wanted)


def read_video(uri: str) -> torch.Tensor:
    """`[T, H, W, 3]` uint8 frames of a local path or a store URI (s3://, file://)."""
    from fastvideo.storage.uri import read_uri
    from fastvideo.utils.video_io import read_mp4

    if "://" not in uri:
        return read_mp4(uri)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "video.mp4"
        path.write_bytes(read_uri(uri, what="video"))
        return read_mp4(path)


def score_video(prompt: str, video: str) -> ScoredVideo:
    try:
        wanted = parse_caption(prompt)
    except ValueError:
        return ScoredVideo(prompt, video, None, None)
    return ScoredVideo(prompt, video, wanted, detect(read_video(video)))


def manifest_videos(run: str | Path) -> list[tuple[str, str]]:
    """(prompt, video URI) of each finished item of a bulk run; `run` is its output folder
    (or s3:// prefix) or the manifest file itself."""
    import io

    import pyarrow.parquet as pq

    from fastvideo.storage.uri import read_uri

    run = str(run)
    uri = run if run.endswith(".parquet") else f"{run.rstrip('/')}/manifest.parquet"
    table = pq.read_table(io.BytesIO(read_uri(uri, what="manifest")))
    missing = {"prompt", "video_uri", "status"} - set(table.column_names)
    if missing:
        raise ValueError(f"{uri} is not a bulk run's manifest: no {sorted(missing)} column(s)")
    # "succeeded" is tasks.manifest.SUCCEEDED; the engine reads the file, never imports tasks.
    return [(row["prompt"], row["video_uri"]) for row in table.to_pylist()
            if row["status"] == "succeeded" and row["video_uri"]]


def accuracy(scored: Sequence[ScoredVideo]) -> dict[str, float]:
    """Fraction right per attribute and on all four, over the scored videos only."""
    counted = [s.right for s in scored if s.right]
    if not counted:
        return {}
    return {name: sum(r[name] for r in counted) / len(counted) for name in (*ATTRIBUTES, "all")}


def report(scored: Sequence[ScoredVideo]) -> str:
    lines = []
    for s in scored:
        if not s.right:
            lines.append(f"  -     {s.prompt}\n        (not a shapes caption: not scored)")
            continue
        mark = "ok" if s.right["all"] else "MISS"
        seen = ", ".join(f"{name} {getattr(s.found, name) or '?'}" +
                         ("" if s.right[name] else f" (wanted {getattr(s.wanted, name)})")
                         for name in ATTRIBUTES)
        lines.append(f"  {mark:<5} {s.prompt}\n        saw: {seen}")
    scores = accuracy(scored)
    if scores:
        counted = sum(1 for s in scored if s.right)
        lines.append(f"prompt adherence over {counted} video(s): " +
                     ", ".join(f"{name} {value:.0%}" for name, value in scores.items()))
    else:
        lines.append("no video with a shapes caption to score")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", nargs="?", help="a bulk run's output folder, s3:// prefix or "
                                               "manifest.parquet")
    parser.add_argument("--video", action="append", default=[], help="a video file (repeat)")
    parser.add_argument("--prompt", action="append", default=[],
                        help="the prompt of each --video, in the same order")
    args = parser.parse_args(argv)
    if (args.run is None) == (not args.video):
        parser.error("give either a run folder or --video/--prompt pairs")
    if len(args.video) != len(args.prompt):
        parser.error(f"{len(args.video)} --video but {len(args.prompt)} --prompt: "
                     "give one prompt per video")
    pairs = manifest_videos(args.run) if args.run else list(zip(args.prompt, args.video))
    scored = [score_video(prompt, video) for prompt, video in pairs]
    print(report(scored))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
