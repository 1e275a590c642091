"""``ray start`` for the stack's nodes: loopback only, and patient on a loaded machine.

    python -m pipeline.stack.ray_start --head|--address=127.0.0.1:GCS_PORT --block ...

Runs Ray's own ``ray start`` (the CLI's code, same flags) with two changes, both through
private names of the pinned Ray 2.60 (like ``pipeline.train.driver.loopback_only``):

- **joining on loopback.** Ray chooses between two behaviours with one switch,
  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``: at 0 its default node address is 127.0.0.1 (what keeps
  every process of ours on loopback), but ``ray start --address`` refuses to join a cluster;
  at 1 it joins, but turns ``127.0.0.1:PORT`` into the machine's own address, where our GCS
  does not listen. Here the switch stays 0 everywhere except in the CLI's one check that
  refuses to join; the processes it starts inherit 0.
- **waiting for the raylet.** ``ray start`` gives a node's raylet a fixed 30 s to register
  with the GCS and then fails. The raylet registers only once its dashboard agent has started
  (a Python process importing much of Ray); at a load of 15-20 on 2 cores that took longer, and
  nodes died while starting. Here the lookup of the node retries for up to
  ``RAY_STACK_NODE_WAIT_S`` seconds (default 180) before Ray's own 30 s count starts.
"""

from __future__ import annotations

import os
import sys
import time
import types


def _patient_get_node(get_node, wait_s: float):
    """``services.get_node`` retried on RuntimeError (node not registered yet) for ``wait_s``."""

    def get_node_waiting(*args, **kwargs):
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return get_node(*args, **kwargs)
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    return get_node_waiting


def main(argv: list[str] | None = None) -> int:
    """Run ``ray start ARGV`` with the join check passed and a patient node lookup."""
    from ray._private import ray_constants, services
    from ray.scripts import scripts

    class _JoinAllowed(types.ModuleType):
        ENABLE_RAY_CLUSTER = True  # only the CLI's join check reads it through this view

        def __getattr__(self, name: str):
            return getattr(ray_constants, name)

    scripts.ray_constants = _JoinAllowed("ray_constants")
    services.get_node = _patient_get_node(
        services.get_node, float(os.environ.get("RAY_STACK_NODE_WAIT_S", "180")))
    sys.argv = ["ray", "start", *(sys.argv[1:] if argv is None else argv)]
    return scripts.main()


if __name__ == "__main__":
    sys.exit(main())
