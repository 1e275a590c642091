"""The production stack on one machine: ``up``, ``down``, ``env``, ``status``.

    python jobs/stack.py up     [--state-dir runs/stack] [--cpus 2,2] [--mlflow-workers 2]
    python jobs/stack.py down   [--state-dir runs/stack]
    python jobs/stack.py env    [--state-dir runs/stack]   # eval "$(python jobs/stack.py env)"
    python jobs/stack.py status [--state-dir runs/stack]
    python jobs/stack.py runtime-env                       # ray job submit --runtime-env-json

``up`` starts SeaweedFS (S3), PostgreSQL, the MLflow server (PostgreSQL backend, artifacts in
S3) and a two-node Ray cluster, all on 127.0.0.1 (``pipeline.stack.stack``), records them in
``<state-dir>/stack.json`` and returns, leaving them running; ``down`` stops them by process
group. ``env`` prints ``export`` lines that point clients (``ray job submit``, MLflow, S3) at the
stack; ``runtime-env`` the JSON of ``ray job submit --runtime-env-json`` that gives a job the
MLflow server and the S3 endpoint and keys. Exit 0 on success, 1 on a failure, 3 when ``env`` / ``status`` find no running stack.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from pipeline.stack import stack


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "down", "env", "status", "runtime-env"])
    parser.add_argument("--state-dir", type=Path, default=stack.DEFAULT_STATE_DIR)
    parser.add_argument("--cpus", default="2,2", help="logical CPUs of the head and node2")
    parser.add_argument("--mlflow-workers", type=int, default=2)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "down":
        stack.down(args.state_dir)
        return 0
    if args.command == "up":
        head, node2 = (int(c) for c in args.cpus.split(","))
        try:
            running = stack.up(args.state_dir, cpus=(head, node2),
                               mlflow_workers=args.mlflow_workers)
        except Exception as err:
            print(f"error: the stack did not start: {err}", file=sys.stderr)
            return 1
        print(json.dumps(running.endpoints))
        print(f"clients: eval \"$(python jobs/stack.py env --state-dir {args.state_dir})\"",
              file=sys.stderr)
        return 0
    running = stack.load(args.state_dir)
    if running is None or not running.alive():
        print(f"no running stack recorded in {args.state_dir} (python jobs/stack.py up)",
              file=sys.stderr)
        return 3
    if args.command == "env":
        for key, value in sorted(running.env.items()):
            print(f"export {key}={shlex.quote(value)}")
    elif args.command == "runtime-env":
        print(json.dumps(running.runtime_env()))
    else:
        print(json.dumps(running.endpoints))
    return 0


if __name__ == "__main__":
    sys.exit(main())
