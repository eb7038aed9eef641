#!/usr/bin/env bash
# The local stack: a Prefect server, SeaweedFS S3 and a process worker per work pool.
#
#   infra/stack.sh start           start it all, create the pools and the bucket, deploy prefect.yaml
#   infra/stack.sh stop            stop everything this script started
#   infra/stack.sh status          what runs
#   eval "$(infra/stack.sh env)"   point this shell at the stack (Prefect API, S3 credentials)
#
# State (logs, pids, the server's SQLite, S3 data, generated S3 credentials) lives in
# $FASTVIDEO_STACK_DIR (default outputs/stack). Ports: PREFECT_PORT (4200), S3_PORT (8333),
# SEAWEED_PORT_BASE (18330: master, volume and filer on +1, +2, +3).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${FASTVIDEO_STACK_DIR:-$REPO/outputs/stack}
PY=${PYTHON:-$REPO/.venv/bin/python}
WEED=${WEED:-$(dirname "$PY")/weed}
PREFECT_PORT=${PREFECT_PORT:-4200}
S3_PORT=${S3_PORT:-8333}
SEAWEED_PORT_BASE=${SEAWEED_PORT_BASE:-18330}
BUCKET=${FASTVIDEO_BUCKET:-fastvideo}
POOLS=(fastvideo-cpu fastvideo-gpu)

env_file() {
    cat <<EOF
export PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT
export AWS_ACCESS_KEY_ID=$(cat "$STATE/s3-access-key")
export AWS_SECRET_ACCESS_KEY=$(cat "$STATE/s3-secret-key")
export AWS_DEFAULT_REGION=us-east-1
export FASTVIDEO_OUTPUT=s3://$BUCKET
EOF
}

make_credentials() {
    [[ -f "$STATE/s3-secret-key" ]] && return
    (umask 077
     "$PY" -c 'import secrets; print("AK" + secrets.token_hex(8).upper())' > "$STATE/s3-access-key"
     "$PY" -c 'import secrets; print(secrets.token_urlsafe(30))' > "$STATE/s3-secret-key"
     "$PY" - "$STATE" <<'EOF'
import json, sys
state = sys.argv[1]
key, secret = (open(f"{state}/s3-{n}-key").read().strip() for n in ("access", "secret"))
identity = {"name": "fastvideo", "credentials": [{"accessKey": key, "secretKey": secret}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
json.dump({"identities": [identity]}, open(f"{state}/s3.json", "w"))
EOF
    )
}

# start_bg NAME CMD...: run CMD in its own session (so stop can signal its whole group).
start_bg() {
    local name=$1; shift
    if is_running "$name"; then echo "$name: already running"; return; fi
    setsid "$@" > "$STATE/logs/$name.log" 2>&1 < /dev/null &
    echo $! > "$STATE/pids/$name"
    echo "$name: started (pid $!, log $STATE/logs/$name.log)"
}

is_running() {
    [[ -f "$STATE/pids/$1" ]] && kill -0 "$(cat "$STATE/pids/$1")" 2> /dev/null
}

stop_one() {
    local name=$1 grace=$2 pid
    is_running "$name" || { rm -f "$STATE/pids/$name"; return; }
    pid=$(cat "$STATE/pids/$name")
    kill -TERM -- "-$pid" 2> /dev/null || true
    for _ in $(seq $((grace * 10))); do kill -0 "$pid" 2> /dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2> /dev/null || true
    rm -f "$STATE/pids/$name"
    echo "$name: stopped"
}

wait_ready() {
    "$PY" - "$PREFECT_PORT" "$BUCKET" <<'EOF'
import sys, time, urllib.request
import boto3
from botocore.config import Config

port, bucket = sys.argv[1], sys.argv[2]
deadline = time.monotonic() + 120
def wait(what, check):
    while True:
        try:
            return check()
        except Exception as exc:
            if time.monotonic() > deadline:
                sys.exit(f"{what} not ready after 120 s: {exc}")
            time.sleep(0.5)
wait("prefect server", lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2))
s3 = boto3.client("s3", config=Config(connect_timeout=2, retries={"max_attempts": 1}))
def bucket_ready():
    if bucket not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
        s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key=".ready", Body=b"")  # a volume is writable
wait("S3", bucket_ready)
print(f"prefect server and s3://{bucket} ready")
EOF
}

start() {
    mkdir -p "$STATE/logs" "$STATE/pids" "$STATE/prefect" "$STATE/seaweedfs"
    make_credentials
    # shellcheck disable=SC1090
    source <(env_file)
    PREFECT_HOME="$STATE/prefect" PREFECT_UI_API_URL="$PREFECT_API_URL" \
        start_bg prefect-server "$PY" -m prefect server start --host 127.0.0.1 --port "$PREFECT_PORT"
    start_bg seaweedfs "$WEED" server -dir="$STATE/seaweedfs" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
        -master.port=$((SEAWEED_PORT_BASE + 1)) -volume.port=$((SEAWEED_PORT_BASE + 2)) \
        -filer.port=$((SEAWEED_PORT_BASE + 3)) -s3 -s3.port="$S3_PORT" \
        -s3.config="$STATE/s3.json" -master.telemetry=false -master.volumeSizeLimitMB=1024
    wait_ready
    for pool in "${POOLS[@]}"; do
        "$PY" -m prefect work-pool inspect "$pool" > /dev/null 2>&1 \
            || "$PY" -m prefect work-pool create "$pool" --type process > /dev/null
    done
    (cd "$REPO" && FASTVIDEO_CODE_DIR="$REPO" "$PY" -m prefect --no-prompt deploy --all \
        > "$STATE/logs/deploy.log" 2>&1) || { echo "deploy failed:"; tail -20 "$STATE/logs/deploy.log"; exit 1; }
    echo "deployed prefect.yaml (log $STATE/logs/deploy.log)"
    for pool in "${POOLS[@]}"; do
        start_bg "worker-$pool" "$PY" -m prefect worker start --pool "$pool" --type process
    done
    cat <<EOF

Prefect UI:  http://127.0.0.1:$PREFECT_PORT
S3:          s3://$BUCKET at $AWS_ENDPOINT_URL (credentials in $STATE)
Use it:      eval "\$(infra/stack.sh env)"
             python -m flows.bulk --dataset examples/prompts.jsonl --output s3://$BUCKET/demo \\
                 --model-path outputs/tiny-wan --height 64 --width 64 --num-frames 9
             prefect deployment run bulk/bulk
Stop it:     infra/stack.sh stop
EOF
}

stop() {
    for pool in "${POOLS[@]}"; do stop_one "worker-$pool" 10; done
    stop_one prefect-server 10
    stop_one seaweedfs 2  # it ignores SIGTERM for a while; nothing to flush for us
}

status() {
    for name in prefect-server seaweedfs "${POOLS[@]/#/worker-}"; do
        if is_running "$name"; then echo "$name: running (pid $(cat "$STATE/pids/$name"))"
        else echo "$name: stopped"; fi
    done
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    env) env_file ;;
    *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
