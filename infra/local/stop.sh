#!/usr/bin/env bash
# Stop what infra/local/start.sh started, by the process ids it recorded (each server and its
# children form one process group). Leaves the MLflow database and the logs in STACK_DIR.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STACK_DIR="${STACK_DIR:-$ROOT/runs/local-stack}"
status=0
for name in mlflow s3; do
  pidfile="$STACK_DIR/$name.pid"
  [[ -f "$pidfile" ]] || continue
  pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    if kill -0 "$pid" 2>/dev/null; then
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" || status=1
    fi
    echo "stopped $name (pid $pid)"
  fi
  rm -f "$pidfile"
done
exit $status
