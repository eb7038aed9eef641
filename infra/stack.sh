#!/usr/bin/env bash
# The local stack: a Prefect server (SQLite or PostgreSQL), SeaweedFS S3 and a process
# worker per work pool.
#
#   infra/stack.sh start [--db postgres]  start it all: pools, bucket, prefect.yaml's
#                                         deployments, infra/automations.yaml, workers
#   infra/stack.sh stop                   stop everything this script started
#   infra/stack.sh status                 what runs
#   eval "$(infra/stack.sh env)"          point this shell at the stack (Prefect API, S3)
#
# State (logs, pids, the server's database, S3 data, generated credentials, the node
# folder of warm workers and GPU slots) lives in $FASTVIDEO_STACK_DIR (default
# outputs/stack). Settings from the environment:
#   FASTVIDEO_DB        sqlite (default) or postgres: a private PostgreSQL cluster in the
#                       state folder on PG_PORT (5433), run as the current user (as
#                       FASTVIDEO_PG_USER, default postgres, when this runs as root)
#   FASTVIDEO_GPUS      the GPUs the GPU pool's runs share out (e.g. 0,1,2,3; default the
#                       ones nvidia-smi lists); the GPU worker runs that many at once
#   PREFECT_PORT (4200), S3_PORT (8333), SEAWEED_PORT_BASE (18330: master, volume and
#   filer on +1, +2, +3, their gRPC and S3's on +11 to +14)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${FASTVIDEO_STACK_DIR:-$REPO/outputs/stack}
PY=${PYTHON:-$REPO/.venv/bin/python}
WEED=${WEED:-$(dirname "$PY")/weed}
PREFECT_PORT=${PREFECT_PORT:-4200}
S3_PORT=${S3_PORT:-8333}
SEAWEED_PORT_BASE=${SEAWEED_PORT_BASE:-18330}
PG_PORT=${PG_PORT:-5433}
PG_OS_USER=${FASTVIDEO_PG_USER:-postgres}
DB=${FASTVIDEO_DB:-sqlite}
BUCKET=${FASTVIDEO_BUCKET:-fastvideo}
POOLS=(fastvideo-cpu fastvideo-gpu)
export FASTVIDEO_WORKER_DIR=${FASTVIDEO_WORKER_DIR:-$STATE/workers}

env_file() {
    cat <<EOF
export PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT
export AWS_ACCESS_KEY_ID=$(cat "$STATE/s3-access-key")
export AWS_SECRET_ACCESS_KEY=$(cat "$STATE/s3-secret-key")
export AWS_DEFAULT_REGION=us-east-1
export FASTVIDEO_OUTPUT=s3://$BUCKET
export FASTVIDEO_WORKER_DIR=$FASTVIDEO_WORKER_DIR
EOF
}

# make_secret FILE: a random secret in FILE (readable by this user only), once.
make_secret() {
    [[ -f "$1" ]] || (umask 077; "$PY" -c 'import secrets; print(secrets.token_urlsafe(30))' > "$1")
}

make_credentials() {
    [[ -f "$STATE/s3-secret-key" ]] && return
    (umask 077
     "$PY" -c 'import secrets; print("AK" + secrets.token_hex(8).upper())' > "$STATE/s3-access-key"
     make_secret "$STATE/s3-secret-key"
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

# alive PID: the process runs (one that exited but is not reaped yet, a zombie, does not).
alive() {
    local stat
    if [[ -d /proc/$1 ]]; then
        stat=$(cat "/proc/$1/stat" 2> /dev/null) || return 1
        stat=${stat##*) }
        [[ ${stat:0:1} != Z ]]
    else
        kill -0 "$1" 2> /dev/null
    fi
}

is_running() {
    [[ -f "$STATE/pids/$1" ]] && alive "$(cat "$STATE/pids/$1")"
}

stop_one() {
    local name=$1 grace=$2 pid
    is_running "$name" || { rm -f "$STATE/pids/$name"; return; }
    pid=$(cat "$STATE/pids/$name")
    kill -TERM -- "-$pid" 2> /dev/null || true
    for _ in $(seq $((grace * 10))); do alive "$pid" || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2> /dev/null || true
    for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
    rm -f "$STATE/pids/$name"
    echo "$name: stopped"
}

# --- PostgreSQL: a private cluster in $STATE/postgres, on 127.0.0.1:$PG_PORT only --------

pg_bin() {
    local initdb
    initdb=$(command -v initdb || ls -d /usr/lib/postgresql/*/bin/initdb 2> /dev/null | sort -V | tail -1)
    [[ -x "$initdb" ]] || { echo "postgres: initdb not found (apt-get install postgresql)" >&2; exit 1; }
    dirname "$(readlink -f "$initdb")"
}

# as_db_user CMD...: run CMD as the cluster's owner (PostgreSQL refuses to run as root).
as_db_user() {
    if [[ $(id -u) == 0 ]]; then
        (cd "$STATE" && setpriv --reuid="$PG_OS_USER" --regid="$PG_OS_USER" --init-groups "$@")
    else
        (cd "$STATE" && "$@")
    fi
}

pg_running() {
    [[ -f "$STATE/postgres/postmaster.pid" ]] && alive "$(head -1 "$STATE/postgres/postmaster.pid")"
}

pg_url() {
    echo "postgresql+asyncpg://fastvideo:$(cat "$STATE/postgres-password")@127.0.0.1:$PG_PORT/prefect"
}

start_postgres() {
    local bin data=$STATE/postgres log=$STATE/logs/postgres.log
    bin=$(pg_bin)
    make_secret "$STATE/postgres-password"
    if [[ $(id -u) == 0 ]] && ! setpriv --reuid="$PG_OS_USER" --regid="$PG_OS_USER" --init-groups test -x "$STATE"; then
        echo "postgres: $STATE is not reachable by $PG_OS_USER, which runs the cluster" >&2; exit 1
    fi
    touch "$log"
    [[ $(id -u) != 0 ]] || chown "$PG_OS_USER:" "$log"
    if [[ ! -f "$data/PG_VERSION" ]]; then
        local pwfile
        mkdir -p -m 700 "$data"
        pwfile=$(mktemp "$STATE/.pgpass.XXXXXX")
        cat "$STATE/postgres-password" > "$pwfile"
        [[ $(id -u) != 0 ]] || chown "$PG_OS_USER:" "$data" "$pwfile"
        as_db_user "$bin/initdb" -D "$data" -U fastvideo --pwfile="$pwfile" \
            --auth=scram-sha-256 -E UTF8 --locale=C.UTF-8 >> "$log" 2>&1 \
            || { rm -f "$pwfile"; echo "postgres: initdb failed:"; tail -5 "$log"; exit 1; }
        rm -f "$pwfile"
    fi
    if pg_running; then
        echo "postgres: already running"
    else
        as_db_user "$bin/pg_ctl" -D "$data" -l "$log" -w -t 60 start -o \
            "-c listen_addresses=127.0.0.1 -p $PG_PORT -c unix_socket_directories=''" > /dev/null \
            || { echo "postgres: did not start:"; tail -5 "$log"; exit 1; }
        echo "postgres: started (port $PG_PORT, data $data, log $log)"
    fi
    local psql=("$bin/psql" -h 127.0.0.1 -p "$PG_PORT" -U fastvideo -d postgres -qtA)
    PGPASSWORD=$(cat "$STATE/postgres-password") "${psql[@]}" \
        -c "SELECT 1 FROM pg_database WHERE datname = 'prefect'" | grep -q 1 \
        || PGPASSWORD=$(cat "$STATE/postgres-password") "${psql[@]}" -c "CREATE DATABASE prefect"
}

stop_postgres() {
    pg_running || return 0
    as_db_user "$(pg_bin)/pg_ctl" -D "$STATE/postgres" -m fast -w stop > /dev/null
    echo "postgres: stopped"
}

# --- GPUs of this node: the GPU pool's worker runs one flow run per GPU at once ------------

node_gpus() {
    "$PY" -c 'from fastvideo.jobs.gpu_slots import node_gpus; print(",".join(node_gpus()))'
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

# apply_automations: infra/automations.yaml on the server, replacing those of the same name.
apply_automations() {
    "$PY" - "$REPO/infra/automations.yaml" <<'EOF'
import sys
import yaml
from prefect import get_client
from prefect.events.schemas.automations import AutomationCore

with get_client(sync_client=True) as client:
    for doc in yaml.safe_load(open(sys.argv[1]))["automations"]:
        automation = AutomationCore.model_validate(doc)
        for old in client.read_automations_by_name(automation.name):
            client.delete_automation(old.id)
        client.create_automation(automation)
        print(f"automation {automation.name}: applied")
EOF
}

start() {
    case "$DB" in sqlite|postgres) ;; *) echo "FASTVIDEO_DB/--db: sqlite or postgres, got $DB" >&2; exit 2 ;; esac
    mkdir -p "$STATE/logs" "$STATE/pids" "$STATE/prefect" "$STATE/seaweedfs" "$FASTVIDEO_WORKER_DIR"
    make_credentials
    # shellcheck disable=SC1090
    source <(env_file)
    local db_env=()
    if [[ $DB == postgres ]]; then
        start_postgres
        db_env=(PREFECT_API_DATABASE_CONNECTION_URL="$(pg_url)")
    fi
    if ! is_running prefect-server; then echo "$DB" > "$STATE/db"; fi
    start_bg prefect-server env PREFECT_HOME="$STATE/prefect" PREFECT_UI_API_URL="$PREFECT_API_URL" \
        "${db_env[@]}" "$PY" -m prefect server start --host 127.0.0.1 --port "$PREFECT_PORT"
    local b=$SEAWEED_PORT_BASE
    start_bg seaweedfs "$WEED" server -dir="$STATE/seaweedfs" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
        -master.port=$((b + 1)) -volume.port=$((b + 2)) -filer.port=$((b + 3)) \
        -master.port.grpc=$((b + 11)) -volume.port.grpc=$((b + 12)) \
        -filer.port.grpc=$((b + 13)) -s3.port.grpc=$((b + 14)) -s3.port.iceberg=0 \
        -s3.port.lance=0 -s3 -s3.port="$S3_PORT" -s3.config="$STATE/s3.json" \
        -master.telemetry=false -master.volumeSizeLimitMB=1024
    wait_ready
    for pool in "${POOLS[@]}"; do
        "$PY" -m prefect work-pool inspect "$pool" > /dev/null 2>&1 \
            || "$PY" -m prefect work-pool create "$pool" --type process > /dev/null
    done
    (cd "$REPO" && FASTVIDEO_CODE_DIR="$REPO" "$PY" -m prefect --no-prompt deploy --all \
        > "$STATE/logs/deploy.log" 2>&1) || { echo "deploy failed:"; tail -20 "$STATE/logs/deploy.log"; exit 1; }
    echo "deployed prefect.yaml (log $STATE/logs/deploy.log)"
    apply_automations
    local gpus limit=()
    gpus=$(node_gpus)
    if [[ -n $gpus ]]; then
        limit=(--limit "$(tr ',' '\n' <<< "$gpus" | wc -l)")
        echo "GPU pool: one run per GPU of $gpus at once (slots in $FASTVIDEO_WORKER_DIR)"
    else
        echo "GPU pool: no GPUs found (set FASTVIDEO_GPUS, e.g. 0,1, to share out slots on CPUs)"
    fi
    start_bg worker-fastvideo-cpu "$PY" -m prefect worker start --pool fastvideo-cpu --type process
    start_bg worker-fastvideo-gpu env FASTVIDEO_GPUS="$gpus" "$PY" -m prefect worker start \
        --pool fastvideo-gpu --type process "${limit[@]}"
    cat <<EOF

Prefect UI:  http://127.0.0.1:$PREFECT_PORT  (database: $(cat "$STATE/db"))
S3:          s3://$BUCKET at $AWS_ENDPOINT_URL (credentials in $STATE)
Use it:      eval "\$(infra/stack.sh env)"
             python -m flows.bulk --dataset examples/prompts.jsonl --output s3://$BUCKET/demo \\
                 --model-path outputs/tiny-wan --height 64 --width 64 --num-frames 9
             prefect deployment run bulk/bulk --param dataset=\$PWD/examples/prompts.jsonl \\
                 --param model_path=\$PWD/outputs/tiny-wan --param output=s3://$BUCKET/nightly \\
                 --param height=64 --param width=64 --param num_frames=9 --param device=cpu
Stop it:     infra/stack.sh stop
EOF
}

stop() {
    for pool in "${POOLS[@]}"; do stop_one "worker-$pool" 10 & done
    wait
    if compgen -G "$FASTVIDEO_WORKER_DIR/w-*.pid" > /dev/null; then
        "$PY" -m fastvideo.jobs.worker_client stop || true  # the warm workers of this node folder
    fi
    stop_one prefect-server 10
    stop_one seaweedfs 2  # it ignores SIGTERM for a while; nothing to flush for us
    stop_postgres
}

status() {
    for name in prefect-server seaweedfs "${POOLS[@]/#/worker-}"; do
        if is_running "$name"; then echo "$name: running (pid $(cat "$STATE/pids/$name"))"
        else echo "$name: stopped"; fi
    done
    [[ -f "$STATE/db" ]] && echo "database: $(cat "$STATE/db")"
    if pg_running; then echo "postgres: running (pid $(head -1 "$STATE/postgres/postmaster.pid"), port $PG_PORT)"
    elif [[ -d "$STATE/postgres" ]]; then echo "postgres: stopped"; fi
}

command=${1:-}
shift || true
case "$command" in
    start)
        while (($#)); do
            case "$1" in
                --db) DB=${2:?--db sqlite|postgres}; shift 2 ;;
                --db=*) DB=${1#--db=}; shift ;;
                *) echo "unknown option $1" >&2; exit 2 ;;
            esac
        done
        start ;;
    stop) stop ;;
    status) status ;;
    env) env_file ;;
    *) echo "usage: $0 start [--db sqlite|postgres]|stop|status|env" >&2; exit 2 ;;
esac
