#!/usr/bin/env bash
# Start the local stack on 127.0.0.1 only: an S3 server (moto) and an MLflow tracking server
# (--workers 1; SQLite backend by default, or PostgreSQL via MLFLOW_BACKEND_URI) whose artifacts
# go through the server into s3://$ARTIFACT_BUCKET. Stop it with infra/local/stop.sh.
#
#   infra/local/start.sh            # then, in your shell:
#   eval "$(infra/local/start.sh --print-env)"   # (prints the exports without starting again)
#
# Settings (environment): STACK_DIR (state, logs, pids; default runs/local-stack), S3_PORT
# (9000), MLFLOW_PORT (5000), ARTIFACT_BUCKET (mlflow-artifacts), PYRAMID_BUCKET (pyramids),
# MLFLOW_BACKEND_URI (default sqlite:///$STACK_DIR/mlflow.db), VENV (default .venv).
# moto keeps objects in memory: artifacts and pyramids on it are gone after stop.sh (the
# MLflow database is kept). For a persistent S3 use docker-compose.yaml (MinIO + PostgreSQL).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
STACK_DIR="${STACK_DIR:-$ROOT/runs/local-stack}"
S3_PORT="${S3_PORT:-9000}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
ARTIFACT_BUCKET="${ARTIFACT_BUCKET:-mlflow-artifacts}"
PYRAMID_BUCKET="${PYRAMID_BUCKET:-pyramids}"
MLFLOW_BACKEND_URI="${MLFLOW_BACKEND_URI:-sqlite:///$STACK_DIR/mlflow.db}"
# moto accepts any credentials; real ones are never needed (or wanted) here.
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-testing}"
export AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-testing}"
export AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"
S3_URL="http://127.0.0.1:$S3_PORT"

print_env() {
  cat <<ENV
export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
export AWS_ENDPOINT_URL=$S3_URL
export AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID
export AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY
export AWS_DEFAULT_REGION=$AWS_DEFAULT_REGION
ENV
}

if [[ "${1:-}" == "--print-env" ]]; then
  print_env
  exit 0
fi

mkdir -p "$STACK_DIR"
for name in s3 mlflow; do
  if [[ -f "$STACK_DIR/$name.pid" ]] && kill -0 "$(cat "$STACK_DIR/$name.pid")" 2>/dev/null; then
    echo "error: $name already running (pid $(cat "$STACK_DIR/$name.pid")); run infra/local/stop.sh" >&2
    exit 1
  fi
done

wait_http() {  # URL SECONDS NAME LOG: wait until URL answers
  "$VENV/bin/python" - "$1" "$2" "$3" "$4" <<'PY'
import sys, time, urllib.request
url, limit, name, log = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
deadline = time.time() + limit
while time.time() < deadline:
    try:
        urllib.request.urlopen(url, timeout=2)
        sys.exit(0)
    except urllib.error.HTTPError:
        sys.exit(0)  # it answers, even if with an error status
    except OSError:
        time.sleep(0.5)
sys.exit(f"error: {name} did not answer at {url} within {limit:.0f} s; see {log}")
PY
}

# Each server is started in its own session (setsid) so that stop.sh can end it and its
# children (MLflow's uvicorn worker) by process group id, and nothing else.
setsid "$VENV/bin/moto_server" -H 127.0.0.1 -p "$S3_PORT" >"$STACK_DIR/s3.log" 2>&1 &
echo $! >"$STACK_DIR/s3.pid"
wait_http "$S3_URL" 60 "S3 server" "$STACK_DIR/s3.log"

"$VENV/bin/python" - "$S3_URL" "$ARTIFACT_BUCKET" "$PYRAMID_BUCKET" <<'PY'
import sys, boto3
url, *buckets = sys.argv[1:]
s3 = boto3.client("s3", endpoint_url=url)
for bucket in buckets:
    s3.create_bucket(Bucket=bucket)
PY

MLFLOW_S3_ENDPOINT_URL="$S3_URL" MLFLOW_DISABLE_TELEMETRY=true setsid "$VENV/bin/mlflow" server \
  --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
  --backend-store-uri "$MLFLOW_BACKEND_URI" \
  --artifacts-destination "s3://$ARTIFACT_BUCKET" \
  >"$STACK_DIR/mlflow.log" 2>&1 &
echo $! >"$STACK_DIR/mlflow.pid"
wait_http "http://127.0.0.1:$MLFLOW_PORT/health" 180 "MLflow server" "$STACK_DIR/mlflow.log"

echo "local stack up: S3 $S3_URL (buckets $ARTIFACT_BUCKET, $PYRAMID_BUCKET), MLflow http://127.0.0.1:$MLFLOW_PORT"
echo "state and logs: $STACK_DIR; stop with infra/local/stop.sh; environment for clients:"
print_env
