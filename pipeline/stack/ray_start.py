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
- **the agent's port, told to the raylet.** Ray's CLI gives the dashboard agent its
  ``--listen-port`` but not the raylet, which then waits for the agent to write that port into
  a file, a fixed 15 s (no setting changes it), and aborts ("Check failed" in
  ``WaitForDashboardAgentPorts``) when the agent's import takes longer: node2 died that way
  twice in a row at a load of 25-35 on 2 cores. Here the raylet's command gets
  ``--dashboard_agent_listen_port`` (a flag of the raylet) with the same port, so it does not
  wait for the file (its other agent ports are already on its command line).
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


def raylet_command(command: list[str]) -> list[str]:
    """The raylet's ``command`` with ``--dashboard_agent_listen_port=PORT`` added, ``PORT``
    taken from ``--listen-port=PORT`` inside its ``--dashboard_agent_command=...``; unchanged
    when the flag is there already or the agent's command names no port."""
    if any(arg.startswith("--dashboard_agent_listen_port=") for arg in command):
        return command
    agent = next((a for a in command if a.startswith("--dashboard_agent_command=")), "")
    port = next((w.split("=", 1)[1] for w in agent.split() if w.startswith("--listen-port=")),
                None)
    return command if port is None else [*command, f"--dashboard_agent_listen_port={port}"]


def _raylet_told_agent_port(start_ray_process, raylet_type: str):
    """``services.start_ray_process`` that passes a raylet's command through
    ``raylet_command``."""

    def start(command, process_type, *args, **kwargs):
        if process_type == raylet_type:
            command = raylet_command(list(command))
        return start_ray_process(command, process_type, *args, **kwargs)

    return start


def main(argv: list[str] | None = None) -> int:
    """Run ``ray start ARGV`` with the join check passed, a patient node lookup and the
    agent's port on the raylet's command line."""
    from ray._private import ray_constants, services
    from ray.scripts import scripts

    class _JoinAllowed(types.ModuleType):
        ENABLE_RAY_CLUSTER = True  # only the CLI's join check reads it through this view

        def __getattr__(self, name: str):
            return getattr(ray_constants, name)

    scripts.ray_constants = _JoinAllowed("ray_constants")
    services.get_node = _patient_get_node(
        services.get_node, float(os.environ.get("RAY_STACK_NODE_WAIT_S", "180")))
    services.start_ray_process = _raylet_told_agent_port(
        services.start_ray_process, ray_constants.PROCESS_TYPE_RAYLET)
    sys.argv = ["ray", "start", *(sys.argv[1:] if argv is None else argv)]
    return scripts.main()


if __name__ == "__main__":
    sys.exit(main())
