"""Shared fixtures. Servers that tests need are started here on 127.0.0.1 and stopped by PID."""

import os

# Ray must bind loopback only (with this unset Ray 2.60 listens on every interface); set before
# any test imports ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# One intra-op thread per process: the suite runs on 2 shared cores (CI) and starts Ray workers
# of its own; oversubscribed torch threads measured up to ~100x slower here than one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402  (after the environment above)

torch.set_num_threads(1)


def _module(item) -> str:
    return item.nodeid.split("::")[0]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under ``pytest -n 2 --dist loadgroup --no-loadscope-reorder`` (``make test``): each
    module is one xdist group, so its module fixtures (a private Ray, an ingested sample) are
    set up once, on one worker; and modules that start Ray or are marked ``slow`` come first
    (collection order is the order xdist hands groups out), so the long ones do not end up
    last on one worker while the other idles."""
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_module(item)))
    weight: dict[str, int] = {}
    for item in items:
        rank = 2 if item.get_closest_marker("ray") else 1 if item.get_closest_marker("slow") else 0
        weight[_module(item)] = max(weight.get(_module(item), 0), rank)
    items.sort(key=lambda item: -weight[_module(item)])  # stable: same order on every worker


def pytest_xdist_node_collection_finished(node, ids):
    """Stop the run when xdist's loadgroup did not tag the node ids with their group (pytest
    9.2 moved node ids out of ``Item._nodeid``, where xdist 3.8 writes the group: every group
    then silently split across workers, and each module's fixtures ran on both)."""
    if node.config.getoption("dist", "no") == "loadgroup" and not all("@" in i for i in ids):
        pytest.exit(f"pytest-xdist's --dist loadgroup does not group tests under pytest "
                    f"{pytest.__version__}: install the pinned versions of pyproject.toml", 4)


@pytest.fixture(autouse=True)
def one_thread():
    """Every test runs with one intra-op thread, whatever an earlier test (or a bench's
    --threads) set: on 2 shared cores, two threads made tiny ops up to 100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

from tests.s3 import s3_server  # noqa: E402,F401  (one S3 server per session, SeaweedFS by default)


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory, request):
    """One private local Ray instance for the module (``start_ray``: loopback, a 0600 token),
    shut down at the end; a module sets its CPUs with ``RAY_LOCAL_CPUS = n`` (default 4)."""
    import ray

    from pipeline.train.driver import start_ray

    cpus = getattr(request.module, "RAY_LOCAL_CPUS", 4)
    with pytest.MonkeyPatch.context() as env:  # start_ray's token variables undone afterwards
        for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
            env.setenv(name, os.environ.get(name, ""))
            if not os.environ[name]:
                env.delenv(name)
        started = start_ray(temp_dir=tmp_path_factory.mktemp("ray"), num_cpus=cpus)
        yield
        if started:
            ray.shutdown()
