"""The orchestration alone at scale: a bulk run of N items whose stages are no-ops.

    python benchmarks/bench_scale.py --items 10000 --shard-size 64 --json-out scale.json

The model is `fastvideo.testing.noop_pipeline` (four phases writing tiny tensors; each
item still gets its checkpoints, a 16x16 one-frame mp4 and a manifest row), so the run
measures what a dataset costs Prefect and the store: task runs, API calls (every HTTP
request the flow's process sends to the server; task run states travel as events over
one websocket, not counted), seconds per item, and the time to write the manifest of N
rows. A real `prefect server start` (SQLite) in its own process, the
local store, the flow in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import httpx  # noqa: E402

API_CALLS = {"count": 0}


def _count_requests() -> None:
    """Count every request the Prefect clients of this process send (sync and async)."""
    sync_send, async_send = httpx.Client.send, httpx.AsyncClient.send

    def send(self, request, *args, **kwargs):
        API_CALLS["count"] += 1
        return sync_send(self, request, *args, **kwargs)

    async def asend(self, request, *args, **kwargs):
        API_CALLS["count"] += 1
        return await async_send(self, request, *args, **kwargs)

    httpx.Client.send, httpx.AsyncClient.send = send, asend


def _task_runs(flow_run_id) -> dict[str, int]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def count() -> dict[str, int]:
        async with get_client() as client:
            runs, offset = [], 0
            while True:
                page = await client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                    offset=offset, limit=200)
                runs += page
                offset += len(page)
                if len(page) < 200:
                    break
        by_state: dict[str, int] = {}
        for run in runs:
            name = run.state.name if run.state else "?"
            by_state[name] = by_state.get(name, 0) + 1
        return {"total": len(runs), **by_state}

    return asyncio.run(count())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=10000)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--workdir", type=Path, help="default: a temporary folder")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)

    from tests.flows.helpers import PrefectServer

    server = PrefectServer(workdir / "prefect")
    server.home.mkdir(parents=True, exist_ok=True)
    server.start()
    os.environ.update({k: v for k, v in server.settings_env().items()
                       if k != "PREFECT_LOGGING_LEVEL"})
    try:
        from fastvideo.storage import open_store
        from fastvideo.testing.noop_pipeline import make_noop_model, register_noop_pipeline
        from flows.bulk import bulk
        from tasks.manifest import read_manifest, write_manifest

        register_noop_pipeline()
        model = make_noop_model(workdir / "noop-model")
        dataset = workdir / "prompts.jsonl"
        dataset.write_text("".join(json.dumps({"prompt": f"item {i}", "item_id": f"i{i:06d}"})
                                   + "\n" for i in range(args.items)))
        _count_requests()
        start = time.perf_counter()
        state = bulk(dataset=str(dataset), output=str(workdir / "out"), model_path=str(model),
                     shard_size=args.shard_size, concurrency=args.concurrency,
                     manifest_interval_s=1e9, return_state=True)
        seconds = time.perf_counter() - start
        calls = API_CALLS["count"]
        rows = read_manifest(open_store(str(workdir / "out")))
        start = time.perf_counter()
        write_manifest.fn(rows, str(workdir / "out"))  # encode + atomic write, as a run ends
        manifest_s = time.perf_counter() - start
        size = (workdir / "out" / "manifest.parquet").stat().st_size
        result = {
            "items": args.items, "shard_size": args.shard_size,
            "concurrency": args.concurrency, "state": state.name,
            "succeeded": sum(r["status"] == "succeeded" for r in rows),
            "wall_s": round(seconds, 1), "s_per_item": round(seconds / args.items, 4),
            "api_calls": calls, "api_calls_per_item": round(calls / args.items, 3),
            "task_runs": _task_runs(state.state_details.flow_run_id),
            "manifest_rows": len(rows), "manifest_bytes": size,
            "manifest_write_s": round(manifest_s, 3),
            "cpus": os.cpu_count(),
        }
    finally:
        server.stop()
    print(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
