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


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under ``pytest -n 2 --dist loadgroup`` (``make test``): every test that starts Ray
    (marked ``ray``) gets one xdist group, meant to run one after another on one worker, the
    rest one group per module (each module's fixtures set up once). Two Ray instances
    starting at once on 2 cores can miss Ray's own 30 s start-up limit under load. (In the
    fresh-clone runs of 2026-12-02 xdist still ran Ray modules on both workers at once.)"""
    for item in items:
        group = "ray" if item.get_closest_marker("ray") else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))


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
