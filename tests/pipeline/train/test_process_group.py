"""The training job's process group listens on loopback only: a 2-worker ``TorchTrainer`` with
``NodeBoundTorchConfig`` on the private local Ray, its sockets listed while the group is up."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.sockets import is_loopback, listening, process_tree

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(),
                                reason="reads sockets from /proc (Linux)")


def _fit_in_thread(torch_config, folder: Path) -> tuple[threading.Thread, dict]:
    """Start a 2-worker run whose rank 0, once the group is up, writes ``ready`` (its store's
    port) and waits for ``done``; both ranks then all-reduce through the group."""
    import ray.train
    from ray.train.torch import TorchTrainer

    def loop(config: dict) -> None:  # pickled by value: the workers need not import tests/
        import torch
        import torch.distributed as dist

        folder = Path(config["folder"])
        if dist.get_rank() == 0:
            (folder / "ready").write_text(json.dumps({"port": int(os.environ["MASTER_PORT"])}))
            deadline = time.monotonic() + 120
            while not (folder / "done").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
        total = torch.ones(1)
        dist.all_reduce(total)
        (folder / f"sum{dist.get_rank()}").write_text(str(int(total.item())))

    trainer = TorchTrainer(
        loop, train_loop_config={"folder": str(folder)}, torch_config=torch_config,
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name="pg", storage_path=str(folder / "runs")))
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except Exception as error:  # reported by the test's assertions
            outcome["error"] = repr(error)

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    return thread, outcome


def _wait_for(path: Path, thread: threading.Thread, outcome: dict, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert thread.is_alive(), f"the run ended before its process group was up: {outcome}"
        assert time.monotonic() < deadline, f"no {path.name} after {timeout} s"
        time.sleep(0.2)


@pytest.mark.ray
def test_the_process_group_store_listens_on_loopback_only(monkeypatch):
    """Every socket of every process the run started (Ray's, the two workers', rank 0's
    ``TCPStore``) listens on 127.0.0.1, the store included; the group works (all-reduce = 2)."""
    import ray

    from pipeline.train.driver import start_ray
    from pipeline.train.process_group import NodeBoundTorchConfig

    if ray.is_initialized():
        pytest.skip("a Ray instance is already connected in this process")
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        monkeypatch.setenv(name, "")  # recorded: what start_ray sets is undone afterwards
        monkeypatch.delenv(name)
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    temp_dir = tempfile.mkdtemp(prefix="r13-", dir="/tmp")  # Ray's socket paths stay < 107 bytes
    folder = Path(tempfile.mkdtemp(prefix="pg-"))
    started = False
    try:
        started = start_ray(temp_dir=temp_dir, num_cpus=3, logging_level="WARNING")
        thread, outcome = _fit_in_thread(NodeBoundTorchConfig(), folder)
        _wait_for(folder / "ready", thread, outcome)
        port = json.loads((folder / "ready").read_text())["port"]
        sockets = listening(process_tree(os.getpid()))
        (folder / "done").touch()
        thread.join(timeout=240)
        assert not thread.is_alive() and "result" in outcome, outcome
        assert [(folder / f"sum{r}").read_text() for r in (0, 1)] == ["2", "2"]
        store = [s for s in sockets if s[1].startswith("tcp") and s[3] == port]
        assert store and all(is_loopback(s[2]) for s in store), (port, store)
        exposed = [(*s, _comm(s[0])) for s in sockets if not is_loopback(s[2])]
        assert exposed == [], "\n".join(map(str, exposed))
    finally:
        if started:
            ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"
