"""``ray start --address=...`` for a second node on this machine that stays on loopback.

    python -m pipeline.stack.ray_join --address=127.0.0.1:GCS_PORT --node-ip-address=127.0.0.1 ...

Ray chooses between two behaviours with one switch, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``: at
0 its default node address is 127.0.0.1 (what keeps every process of ours on loopback), but
``ray start --address`` then refuses to join a cluster; at 1 it joins, but turns the address
``127.0.0.1:PORT`` into the machine's own address (``resolve_ip_for_localhost``), where our GCS
does not listen, so the node never joins. This entry point runs Ray's own ``ray start`` with
the switch at 0 everywhere except in the one check that refuses to join (the CLI module's view
of Ray's constants; private API of the pinned Ray 2.60, like ``pipeline.train.driver``'s
``loopback_only``). The processes it starts inherit 0.
"""

from __future__ import annotations

import sys
import types


def main(argv: list[str] | None = None) -> int:
    """Run ``ray start ARGV`` (the CLI's own code) with the multi-node check passed."""
    from ray._private import ray_constants
    from ray.scripts import scripts

    class _JoinAllowed(types.ModuleType):
        ENABLE_RAY_CLUSTER = True  # only the CLI's join check reads it through this view

        def __getattr__(self, name: str):
            return getattr(ray_constants, name)

    scripts.ray_constants = _JoinAllowed("ray_constants")
    sys.argv = ["ray", "start", *(sys.argv[1:] if argv is None else argv)]
    return scripts.main()


if __name__ == "__main__":
    sys.exit(main())
