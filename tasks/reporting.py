"""What a run shows in the Prefect UI besides task states: progress, results, a summary.

The artifacts are keyed per output (`tasks.runs.output_key`, or the run's `artifact_key`),
so each output has its progress, results and summary on the Artifacts page, one version
per run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from fastvideo.jobs.items import ItemResult
from tasks.manifest import FAILED, SUCCEEDED
from tasks.runs import Lineage

# A table artifact is for eyes, not a copy of the manifest: failures first, then the latest.
MAX_TABLE_ROWS = 200
MAX_ERROR_CHARS = 500
_TABLE_COLUMNS = ("status", "error", "failed_stage", "item_id", "prompt", "seed", "seconds",
                  "video", "resumed_from_step")


@dataclass
class Tally:
    """A run's items by outcome."""

    total: int
    made: int = 0
    """Succeeded, the video made by this run."""
    cached: int = 0
    """Succeeded, the video made by an earlier run (in the manifest, or a `Cached` task)."""
    failed: int = 0

    @property
    def succeeded(self) -> int:
        return self.made + self.cached

    @property
    def to_go(self) -> int:
        return max(self.total - self.succeeded - self.failed, 0)

    def count_shard(self, results: dict[str, list[ItemResult]]) -> None:
        """Count a finished shard by its items' last step (see `flows.pipeline`: a result
        Prefect returned from its cache says `cached`)."""
        for result in list(results.values())[-1]:
            if not result.ok:
                self.failed += 1
            elif result.info.get("cached"):
                self.cached += 1
            else:
                self.made += 1

    def describe(self) -> str:
        return (f"{self.succeeded} of {self.total} videos ({self.made} made in this run, "
                f"{self.cached} cached from earlier runs), {self.failed} failed, "
                f"{self.to_go} to go")


class DatasetProgress:
    """A progress artifact: the share of the items that have their video (failed items
    keep it under 100%), with the counts by outcome as its description."""

    def __init__(self, tally: Tally, dataset: str, key: str) -> None:
        self.tally = tally
        self.dataset = dataset
        self.artifact_id = create_progress_artifact(
            self._percent(), key=f"{key}-progress", description=self._description())

    def _percent(self) -> float:
        return min(100.0, 100.0 * self.tally.succeeded / max(self.tally.total, 1))

    def _description(self) -> str:
        return f"{self.dataset}: {self.tally.describe()}"

    def update(self) -> None:
        update_progress_artifact(self.artifact_id, self._percent(),
                                 description=self._description())


def results_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Failures first, then the latest successes; status and error lead."""
    failed = [r for r in rows if r["status"] == FAILED]
    ok = [r for r in rows if r["status"] == SUCCEEDED]
    return [{"status": r["status"], "error": _error(r.get("error")),
             "failed_stage": r.get("failed_stage"), "item_id": r["item_id"],
             "prompt": r.get("prompt"), "seed": r.get("seed"), "seconds": _seconds(r),
             "video": video_link(r.get("video_uri")),
             "resumed_from_step": r.get("resumed_from_step")}
            for r in (failed + ok[::-1])[:MAX_TABLE_ROWS]]


def _error(error: str | None) -> str | None:
    if error is None or len(error) <= MAX_ERROR_CHARS:
        return error
    return error[:MAX_ERROR_CHARS] + " ... (in full in the manifest)"


def _seconds(row: dict[str, Any]) -> float | None:
    """Engine seconds of the item in its run, over every phase and the video."""
    values = [v for k, v in row.items() if k.endswith("_seconds") and v is not None]
    return round(sum(values), 1) if values else None


def video_link(uri: str | None) -> str | None:
    """A local video as a markdown link named by its file (the UI renders it); any other
    URI as text, to copy."""
    if not uri:
        return None
    if uri.startswith("/") or uri.startswith("file://"):
        path = uri.removeprefix("file://")
        return f"[{path.rsplit('/', 1)[-1]}](file://{quote(path)})"
    return uri


def summary_markdown(tally: Tally, seconds: float, output_uri: str, manifest_uri: str,
                     rows: list[dict[str, Any]], lineage: Lineage) -> str:
    """Items by outcome, throughput, the runs before this one, and where the outputs are."""
    per_minute = 60.0 * tally.made / seconds if seconds > 0 else 0.0
    lines = [
        "# Bulk generation",
        "",
        "| | |", "|---|---|",
        f"| items | {tally.total} |",
        f"| succeeded | {tally.succeeded}: {tally.made} made in this run, {tally.cached} "
        "cached from earlier runs |",
        f"| failed | {tally.failed} |",
        f"| time | {seconds:.1f} s ({per_minute:.1f} videos/min) |",
        f"| continues | {lineage.continues.markdown() if lineage.continues else 'none'} |",
    ]
    if lineage.crashed:
        lines.append(f"| marked Crashed | {', '.join(r.markdown() for r in lineage.crashed)} |")
    if lineage.running:
        lines.append("| also running over this output | "
                     f"{', '.join(r.markdown() for r in lineage.running)} |")
    lines += [f"| videos | `{output_uri.rstrip('/')}/videos/` |",
              f"| manifest | `{manifest_uri}` |"]
    failed = [r for r in rows if r["status"] == FAILED]
    if failed:
        lines += ["", "## Failures (first 20)", "", "| item | stage | error |", "|---|---|---|"]
        for r in failed[:20]:
            error = str(r.get("error") or "").replace("|", "\\|").replace("\n", " ")[:300]
            lines.append(f"| {r['item_id']} | {r.get('failed_stage')} | {error} |")
    return "\n".join(lines)


def publish_results(rows: list[dict[str, Any]], tally: Tally, seconds: float,
                    output_uri: str, manifest_uri: str, key: str, lineage: Lineage) -> None:
    """The results table and the summary, as artifacts of the current flow run."""
    create_table_artifact(results_table(rows), key=f"{key}-results",
                          description=f"Results (at most {MAX_TABLE_ROWS} rows; all in "
                                      f"{manifest_uri})")
    create_markdown_artifact(summary_markdown(tally, seconds, output_uri, manifest_uri, rows,
                                              lineage),
                             key=f"{key}-summary", description="Summary of the bulk run")
