"""Kill-anywhere soak: a bulk run to S3 killed with SIGKILL at random moments until it ends.

    python benchmarks/soak_kill.py --items 20 --json-out soak.json

A real `prefect server start` and SeaweedFS S3 on loopback, the tiny random-weight Wan
checkpoint on CPU. First an uninterrupted reference run. Then `python -m flows.bulk
--dispatch worker` over the same dataset into another prefix, killed with SIGKILL after a
random time (the flow's process group, the warm worker, or both), again and again, until
a run ends on its own. After each kill every complete checkpoint is recorded (its
manifest names data files with a fresh nonce per write), so a finished stage computed
again would show as changed files. Checks: every item succeeded, every video's sha256
equals the reference run's, no recorded checkpoint was rewritten.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

SIZES = dict(height=32, width=32, num_frames=5, num_inference_steps=12, guidance_scale=5.0)


def _checkpoints(client, bucket: str, prefix: str) -> dict[str, str]:
    """Key of each complete checkpoint -> its manifest's bytes (names its data files)."""
    found: dict[str, str] = {}
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                             Prefix=f"{prefix}/checkpoints/")
    for page in pages:
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if key.endswith("/manifest.json") and "-progress/" not in key:
                try:
                    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
                except client.exceptions.NoSuchKey:
                    continue
                found[key] = json.dumps(sorted(json.loads(body)["files"].items()))
    return found


def _run(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _kill_workers(worker_dir: Path) -> int:
    killed = 0
    for pid_file in worker_dir.glob("w-*.pid"):
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
            killed += 1
        except (ProcessLookupError, ValueError):
            pass
    return killed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=20)
    parser.add_argument("--max-kills", type=int, default=8)
    parser.add_argument("--kill-after", type=float, nargs=2, default=(4.0, 20.0),
                        metavar=("MIN_S", "MAX_S"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="soak-"))
    workdir.mkdir(parents=True, exist_ok=True)

    from fastvideo.testing.tiny_wan import make_tiny_wan
    from tests.flows.helpers import PrefectServer, read_manifest, stop_group
    from tests.s3_server import S3Server

    model = make_tiny_wan(workdir / "tiny-wan")
    dataset = workdir / "prompts.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": f"a cat walks, take {i}",
                                           "item_id": f"item-{i:02d}"}) + "\n"
                               for i in range(args.items)))
    server = PrefectServer(workdir / "prefect")
    server.home.mkdir(parents=True, exist_ok=True)
    server.start()
    result: dict = {"items": args.items, "sizes": SIZES, "kills": []}
    try:
        with S3Server() as s3:
            bucket = s3.create_bucket("soak")
            os.environ.update(s3.env())  # this process reads the manifests too
            worker_dir = workdir / "workers"
            env = {**os.environ, **server.settings_env(), **s3.env(),
                   "FASTVIDEO_WORKER_DIR": str(worker_dir), "PYTHONPATH": str(ROOT)}
            options = [f"--{k.replace('_', '-')}={v}" for k, v in SIZES.items()]

            def cmd(prefix: str, *extra: str) -> list[str]:
                return [sys.executable, "-m", "flows.bulk", "--dataset", str(dataset),
                        "--output", f"s3://{bucket}/{prefix}", "--model-path", str(model),
                        "--device", "cpu", "--checkpoint-every", "2", *options, *extra]

            start = time.perf_counter()
            reference = _run(cmd("reference"), env, workdir / "reference.log")
            if reference.wait() != 0:
                raise RuntimeError(f"the reference run failed; see {workdir}/reference.log")
            result["reference_s"] = round(time.perf_counter() - start, 1)

            client = s3.client()
            seen: dict[str, str] = {}
            start = time.perf_counter()
            runs = 0
            while True:
                runs += 1
                proc = _run(cmd("soak", "--dispatch", "worker",
                                "--worker-idle-timeout-s", "60"), env, workdir / "soak.log")
                if len(result["kills"]) >= args.max_kills:  # enough: let it run to its end
                    if proc.wait() == 0 or runs > args.max_kills + 3:
                        break
                    continue  # items failed by the last kill: run again
                delay = rng.uniform(*args.kill_after)
                try:
                    if proc.wait(timeout=delay) == 0:
                        break
                    continue  # ended Failed (a worker killed under it): run again
                except subprocess.TimeoutExpired:
                    pass
                target = rng.choice(["flow", "worker", "both"])
                if target in ("flow", "both"):
                    os.killpg(proc.pid, signal.SIGKILL)
                workers = _kill_workers(worker_dir) if target in ("worker", "both") else 0
                if target == "worker":
                    proc.wait()  # the flow sees its shard fail and goes on, or ends
                stop_group(proc, grace_s=0.0)
                now = _checkpoints(client, bucket, "soak")
                result["kills"].append({"after_s": round(delay, 1), "target": target,
                                        "workers_killed": workers,
                                        "complete_checkpoints": len(now)})
                for key, files in now.items():
                    seen.setdefault(key, files)
            result["runs"] = runs
            result["soak_s"] = round(time.perf_counter() - start, 1)
            result["last_exit_code"] = proc.returncode
            final = _checkpoints(client, bucket, "soak")
            rewritten = sorted(k for k, files in seen.items() if final.get(k) != files)
            rows = read_manifest(f"s3://{bucket}/soak")
            ref = read_manifest(f"s3://{bucket}/reference")
            result.update(
                manifest_rows=len(rows),
                succeeded=sum(r["status"] == "succeeded" for r in rows.values()),
                videos_equal_reference=sum(rows[i]["video_sha256"] == ref[i]["video_sha256"]
                                           for i in rows if i in ref),
                checkpoints_recorded_after_kills=len(seen),
                finished_checkpoints_rewritten=rewritten)
            _kill_workers(worker_dir)
    finally:
        server.stop()
    print(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))
    ok = (result["succeeded"] == args.items and result["videos_equal_reference"] == args.items
          and not result["finished_checkpoints_rewritten"])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
