"""What a run shows in the Prefect UI besides task states: progress, results, a summary."""

from __future__ import annotations

from typing import Any

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from tasks.manifest import FAILED, SUCCEEDED

# A table artifact is for eyes, not a copy of the manifest: failures first, then the latest.
MAX_TABLE_ROWS = 200
_TABLE_COLUMNS = ("item_id", "status", "prompt", "seed", "video_uri", "failed_stage", "error",
                  "seconds", "resumed_from_step")


class DatasetProgress:
    """A progress artifact: items finished (succeeded or failed) out of the dataset."""

    def __init__(self, total: int, done: int, description: str) -> None:
        self.total = max(total, 1)
        self.artifact_id = create_progress_artifact(self._percent(done), description=description)

    def _percent(self, done: int) -> float:
        return min(100.0, 100.0 * done / self.total)

    def update(self, done: int) -> None:
        update_progress_artifact(self.artifact_id, self._percent(done))


def results_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    failed = [r for r in rows if r["status"] == FAILED]
    ok = [r for r in rows if r["status"] == SUCCEEDED]
    shown = (failed + ok[::-1])[:MAX_TABLE_ROWS]
    return [{c: (_seconds(r) if c == "seconds" else r.get(c)) for c in _TABLE_COLUMNS}
            for r in shown]


def _seconds(row: dict[str, Any]) -> float | None:
    """Engine seconds of the item in its run, over every phase and the video."""
    values = [v for k, v in row.items() if k.endswith("_seconds") and v is not None]
    return round(sum(values), 3) if values else None


def summary_markdown(rows: list[dict[str, Any]], made: int, seconds: float,
                     output_uri: str, manifest_uri: str) -> str:
    """Items, failures, throughput and where the outputs are, as markdown."""
    failed = [r for r in rows if r["status"] == FAILED]
    per_minute = 60.0 * made / seconds if seconds > 0 else 0.0
    lines = [
        "# Bulk generation",
        "",
        "| | |", "|---|---|",
        f"| items in dataset | {len(rows)} |",
        f"| succeeded | {len(rows) - len(failed)} |",
        f"| failed | {len(failed)} |",
        f"| made in this run | {made} in {seconds:.1f} s ({per_minute:.1f} items/min) |",
        f"| videos | `{output_uri.rstrip('/')}/videos/` |",
        f"| manifest | `{manifest_uri}` |",
    ]
    if failed:
        lines += ["", "## Failures (first 20)", "", "| item | stage | error |", "|---|---|---|"]
        for r in failed[:20]:
            error = str(r.get("error") or "").replace("|", "\\|").replace("\n", " ")[:300]
            lines.append(f"| {r['item_id']} | {r.get('failed_stage')} | {error} |")
    return "\n".join(lines)


def publish_results(rows: list[dict[str, Any]], made: int, seconds: float, output_uri: str,
                    manifest_uri: str, key: str | None = None) -> None:
    """The results table and the summary, as artifacts of the current flow run."""
    create_table_artifact(results_table(rows), key=f"{key}-results" if key else None,
                          description=f"Results (at most {MAX_TABLE_ROWS} rows; all in "
                                      f"{manifest_uri})")
    create_markdown_artifact(summary_markdown(rows, made, seconds, output_uri, manifest_uri),
                             key=f"{key}-summary" if key else None,
                             description="Summary of the bulk run")
