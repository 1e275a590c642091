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
    started = start_ray(temp_dir=tmp_path_factory.mktemp("ray"), num_cpus=cpus)
    yield
    if started:
        ray.shutdown()
