"""Faults of the production stack itself (issue 15, part 2), entries of ``bench/faults.py``.

    python bench/faults.py --json --only worker_killed,driver_killed,mlflow_down,node_killed

One stack (``pipeline.stack.stack.up``: SeaweedFS, PostgreSQL, the MLflow server, a Ray head
with 4 logical CPUs and a second node with 2) is started for all the stack entries and stopped
by ``down`` at the end. The demo sample (``TRAIN`` + ``VAL`` scenes) is ingested into
``s3://pyramids/`` by a ``ray job submit``. Each entry then submits its own training job
(``jobs/configs/fmow_demo.yaml``, ``EPOCHS`` epochs, a checkpoint every epoch in
``s3://checkpoints/faults-<stamp>/<entry>``, 2 workers spread over both nodes, MLflow
experiment ``stack-faults``) and injects its fault into it while it runs, by watching the job's
output for the rank-0 epoch lines and Ray Train's checkpoint snapshot in S3 (``_committed``):

- ``worker_killed``: SIGKILL of one ``RayTrainWorker`` process a third of an epoch after the
  checkpoint of epoch 2 is committed (``_mid_epoch_after``);
- ``driver_killed``: SIGKILL of the job's driver (its pid from the jobs API) at the same
  moment, then the same job (same run name and storage path) submitted again;
- ``mlflow_down``: the MLflow server stopped right after epoch 1's line (rank 0 logs epoch 1
  into the outage), kept down ``MLFLOW_DOWN_S``, then started again on the same port
  (``pipeline.stack.stack.restart_mlflow``; its start adds a minute or two here);
- ``node_killed``: SIGKILL of the second node's raylet at the same moment as the first two
  (run last: the stack has one node afterwards).

A restart is ok when it resumed from the last committed checkpoint and redid at most one
checkpoint interval (one epoch: ``checkpoint_every=1``).

Figures of every entry (``_figures``): the job's exit, the MLflow runs with the run's key
(must be one) and its status, each epoch metric's steps (``lost``: missing steps,
``duplicated``: steps logged more than once), the epoch lines printed (an epoch printed twice
was redone after its metrics went out), where a restart resumed (``resumed_before_epoch``),
and the checkpoint folders left in S3 (``orphans``: folders that are incomplete or that Ray
Train's snapshot does not list).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STACK_ENTRIES = ("worker_killed", "driver_killed", "mlflow_down", "node_killed")
TRAIN, VAL, EPOCHS = 16, 4, 4
EXPERIMENT = "stack-faults"
CONFIG = "jobs/configs/fmow_demo.yaml"
CPUS = (4, 2)  # the head can hold both workers when node2 is gone
JOB_TIMEOUT_S = 1500  # a 2-core machine shared with other runs: generous
MLFLOW_DOWN_S = 30.0  # plus the server's own start (1-2 min on the loaded machine)
JOB_ENV = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
           "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_REGION")
EPOCH_LINE = re.compile(r"\[train\] epoch (\d+)/(\d+): train loss")  # not the step counter
RESUMED_LINE = re.compile(r"\[train\] resumed from the checkpoint before epoch (\d+)")


def say(text: str) -> None:
    print(f"[faults] {text}", file=sys.stderr, flush=True)


@dataclass
class Rig:
    """The running stack and what every entry shares."""

    stack: Any  # pipeline.stack.stack.Stack
    work: Path
    manifest: str
    storage: str  # s3://checkpoints/faults-<stamp>

    def token(self) -> Path:
        return Path(self.stack.env["RAY_AUTH_TOKEN_PATH"])

    def api(self, path: str) -> Any:
        """GET ``path`` of the Ray dashboard (jobs and state API) with the cluster's token."""
        request = urllib.request.Request(
            self.stack.endpoints["ray_dashboard"] + path,
            headers={"Authorization": f"Bearer {self.token().read_text().strip()}"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.load(response)


class Job:
    """One ``ray job submit`` (blocking, its output into ``log``) started in the background."""

    def __init__(self, rig: Rig, name: str, argv: list[str]):
        from pipeline.stack.ray_cluster import VENV_BIN, ray_env

        self.rig, self.name, self.log = rig, name, rig.work / "logs" / f"{name}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", rig.stack.env["RAY_ADDRESS"],
               "--submission-id", name, "--working-dir", ".",
               "--runtime-env-json", json.dumps(rig.stack.runtime_env()), "--", "python", *argv]
        say(f"  ray job submit --submission-id {name} -- python {' '.join(argv[:1])} ...")
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, env=ray_env(rig.token()), cwd=ROOT, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        self.started = time.monotonic()

    def lines(self) -> list[str]:
        """The job's output so far, up to Ray's closing status (a failed job's status message
        repeats the tail of its log)."""
        lines = self.log.read_text(errors="replace").splitlines()
        end = next((i for i, line in enumerate(lines) if "Status message:" in line), len(lines))
        return lines[:end]

    def epochs_seen(self) -> list[int]:
        """The 1-based epoch numbers of the epoch lines printed so far, in order."""
        return [int(m.group(1)) for m in map(EPOCH_LINE.search, self.lines()) if m]

    def wait_epoch(self, epoch: int, timeout_s: float = JOB_TIMEOUT_S) -> float:
        """Wait until epoch ``epoch``'s line is printed (``epoch`` lines in all); the time."""
        deadline = time.monotonic() + timeout_s
        while len(self.epochs_seen()) < epoch:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"job {self.name} ended or stalled before epoch {epoch} "
                                   f"(exit {self.proc.poll()}; log {self.log})")
            time.sleep(0.5)
        return time.monotonic()

    def wait(self, timeout_s: float = JOB_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout=max(1.0, timeout_s - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.stop()
            return -1

    def stop(self) -> None:
        """End ``ray job submit`` (our process group) and the job itself (``ray job stop``)."""
        from pipeline.stack.process import Group, stop_group

        with contextlib.suppress(Exception):
            stop_group(Group.of(self.proc.pid), timeout_s=5)
        with contextlib.suppress(Exception):
            self._cli("stop")

    def status(self) -> str:
        return str(self.rig.api(f"/api/jobs/{self.name}").get("status"))

    def driver_pid(self) -> int:
        return int(self.rig.api(f"/api/jobs/{self.name}")["driver_info"]["pid"])

    def _cli(self, *args: str) -> str:
        from pipeline.stack.ray_cluster import VENV_BIN, ray_env

        return subprocess.run([str(VENV_BIN / "ray"), "job", *args, "--address",
                               self.rig.stack.env["RAY_ADDRESS"], self.name],
                              env=ray_env(self.rig.token()), capture_output=True, text=True,
                              timeout=120).stdout


# --------------------------------------------------------------------------- the rig


def build_rig(work: Path) -> Rig:
    """Stack up, the demo sample generated and ingested into S3 (a job on the stack)."""
    from pipeline.stack import stack as stack_mod
    from pipeline.synth.demo import DEMO_COARSEST

    say(f"starting the stack in {work / 'stack'} (head {CPUS[0]} CPUs, node2 {CPUS[1]})")
    running = stack_mod.up(work / "stack", cpus=CPUS)
    os.environ.update({k: running.env[k] for k in JOB_ENV})  # this process reads MLflow and S3
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    rig = Rig(running, work, "", f"s3://checkpoints/faults-{stamp}")
    raw, tag = make_raw(work / "data", TRAIN, VAL)
    dst = f"s3://pyramids/faults-{stamp}/{tag}"
    job = Job(rig, f"faults-ingest-{stamp}", ["jobs/ingest_fmow.py", "--src", str(raw), "--dst",
                                              dst, "--workers", "2", "--coarsest",
                                              str(DEMO_COARSEST)])
    if job.wait() != 0:
        raise RuntimeError(f"the ingest job failed; log {job.log}")
    rig.manifest = f"{dst}/manifest.parquet"
    return rig


def make_raw(root: Path, train: int, val: int) -> tuple[Path, str]:
    """The demo sample under ``root/raw-<fingerprint>``, generated once."""
    from pipeline.synth.demo import demo_raw_once

    return demo_raw_once(root, train, val, say)


def train_argv(rig: Rig, name: str) -> list[str]:
    sets = [f"data.manifest={rig.manifest}", f"run.storage_path={rig.storage}",
            f"run.name={name}", f"run.mlflow_experiment={EXPERIMENT}", f"optim.epochs={EPOCHS}",
            "run.checkpoint_every=1", "run.max_failures=2", "scaling.placement_strategy=SPREAD"]
    return ["jobs/train_fmow.py", "--config", CONFIG, *[x for s in sets for x in ("--set", s)],
            "--json"]


def _mid_epoch_after(job: Job, name: str, epoch: int) -> int:
    """Wait for epoch ``epoch``'s line and for its checkpoint to be committed (Ray Train's
    snapshot in S3 lists it), then a third of the time an epoch takes (measured on the
    previous one): the next epoch is under way. Returns the epochs committed by then."""
    first = job.wait_epoch(epoch - 1)
    second = job.wait_epoch(epoch)
    deadline = time.monotonic() + 300
    while _committed(job.rig, name) < epoch and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(max(1.5, (second - first) / 3))
    return _committed(job.rig, name)


def _committed(rig: Rig, name: str) -> int:
    """Epochs whose checkpoint Ray Train has committed: from ``checkpoint_manager_snapshot.json``
    in S3 (each checkpoint's reported metrics hold its 0-based ``epoch``); 0 without one."""
    from pipeline.store import storage

    snapshot = f"{rig.storage}/{name}/checkpoint_manager_snapshot.json"
    try:
        results = json.loads(storage.read_bytes(snapshot))["checkpoint_results"]
    except Exception:  # noqa: BLE001 - not written yet
        return 0
    return max((int(r["metrics"]["epoch"]) + 1 for r in results), default=0)


# --------------------------------------------------------------------------- the figures


def _figures(rig: Rig, name: str, lines: list[str], code: int) -> dict[str, Any]:
    """What every stack entry reports (see the module docstring)."""
    from pipeline.track import tracking

    runs = tracking.runs_with_key(f"{rig.storage}/{name}", EXPERIMENT)
    status, steps, tags = None, {}, {}
    if runs:
        info = tracking.run_info(runs[0])
        status, tags = info["status"], info["tags"]
        for key in ("train/loss", "val/accuracy"):
            steps[key] = [s for s, _ in tracking.metric_history(runs[0], key)]
    lost = sorted({s for k in steps for s in set(range(EPOCHS)) - set(steps[k])})
    duplicated = sorted({s for k in steps for s in steps[k] if steps[k].count(s) > 1})
    printed = [int(m.group(1)) for m in map(EPOCH_LINE.search, lines) if m]
    resumed = [int(m.group(1)) for m in map(RESUMED_LINE.search, lines) if m]
    return {"exit_code": code, "mlflow_runs": len(runs), "run_status": status,
            "metric_steps": steps.get("train/loss"), "lost_points": lost,
            "duplicated_points": duplicated, "epoch_lines": printed,
            "epochs_redone": len(printed) - len(set(printed)), "resumed_before_epoch": resumed,
            "ended_by": tags.get(tracking.ENDED_BY_TAG), **_checkpoints(rig, name)}


def _checkpoints(rig: Rig, name: str) -> dict[str, Any]:
    """Checkpoint folders in S3 under the run, and those that are orphans."""
    from pipeline.store import storage

    base = f"{rig.storage}/{name}"
    keys = storage.list_prefix(base)
    folders: dict[str, set[str]] = {}
    for key in keys:
        rel = key[len(base) + 1:]
        if rel.startswith("checkpoint_") and "/" in rel:
            folder, _, file = rel.partition("/")
            folders.setdefault(folder, set()).add(file)
    snapshot = f"{base}/checkpoint_manager_snapshot.json"
    listed = set(re.findall(r"checkpoint_[0-9_.:-]+", storage.read_bytes(snapshot).decode())) \
        if snapshot in keys else set()
    orphans = sorted(f for f, files in folders.items()
                     if f not in listed or not {"state.pt", "meta.json"} <= files)
    return {"checkpoint_folders": sorted(folders), "orphans": orphans}


def _common_ok(f: dict[str, Any]) -> bool:
    return (f["exit_code"] == 0 and f["mlflow_runs"] == 1 and f["run_status"] == "FINISHED"
            and not f["lost_points"] and not f["duplicated_points"])


# --------------------------------------------------------------------------- the entries


def entry_worker_killed(rig: Rig) -> dict[str, Any]:
    """SIGKILL of one Ray Train worker mid-epoch: the run finishes, at most one checkpoint
    interval redone, one MLflow run, no orphan checkpoint."""
    job = Job(rig, f"{rig.storage.rsplit('/', 1)[1]}-worker", train_argv(rig, "worker_killed"))
    try:
        committed = _mid_epoch_after(job, "worker_killed", 2)
        actors = rig.api("/api/v0/actors?limit=10000&detail=true&filter_keys=class_name"
                         "&filter_predicates=%3D&filter_values=RayTrainWorker")
        alive = [a for a in actors["data"]["result"]["result"] if a.get("state") == "ALIVE"]
        victim = int(alive[-1]["pid"])
        os.kill(victim, signal.SIGKILL)
        printed = len(job.epochs_seen())
        say(f"  SIGKILL worker pid {victim}: {printed} epoch lines, {committed} checkpoints")
        code = job.wait()
    finally:
        job.stop()
    f = _figures(rig, "worker_killed", job.lines(), code)
    f.update(epoch_lines_at_kill=printed, committed_at_kill=committed)
    f["ok"] = _restart_ok(f, committed)
    return f


def _restart_ok(f: dict[str, Any], committed: int) -> bool:
    """Finished with one run and every point once, resumed once, from a checkpoint no older
    than the last one committed at the fault (a later one when the run got to commit another
    before Ray noticed the fault: a dead node is seen only after its heartbeats time out), at
    most one checkpoint interval (one epoch) redone, no orphan checkpoint."""
    resumed = f["resumed_before_epoch"]
    return (_common_ok(f) and len(resumed) == 1 and resumed[0] >= committed + 1
            and f["epochs_redone"] <= 1 and not f["orphans"])


def entry_driver_killed(rig: Rig) -> dict[str, Any]:
    """SIGKILL of the job's driver mid-epoch, then the same job submitted again: it resumes
    from the last checkpoint in S3 and continues the same MLflow run; the dead driver's run
    is marked KILLED when the next start sees it (tag ``pipeline.ended_by``)."""
    from pipeline.track import tracking

    stem = f"{rig.storage.rsplit('/', 1)[1]}-driver"
    first = Job(rig, stem, train_argv(rig, "driver_killed"))
    try:
        committed = _mid_epoch_after(first, "driver_killed", 2)
        pid = first.driver_pid()
        os.kill(pid, signal.SIGKILL)
        say(f"  SIGKILL driver pid {pid}: {committed} checkpoints")
        first.wait(timeout_s=300)
    finally:
        first.stop()
    runs = tracking.runs_with_key(f"{rig.storage}/driver_killed", EXPERIMENT)
    left = tracking.run_info(runs[0])["status"] if runs else None
    first_job_status = first.status()
    again = Job(rig, f"{stem}-again", train_argv(rig, "driver_killed"))
    try:
        code = again.wait()
    finally:
        again.stop()
    f = _figures(rig, "driver_killed", again.lines(), code)
    f.update(first_job_status=first_job_status, status_after_kill=left,
             first_run_id=runs[0] if runs else None,
             same_run=bool(runs) and tracking.runs_with_key(
                 f"{rig.storage}/driver_killed", EXPERIMENT) == runs[:1],
             epoch_lines_before_kill=first.epochs_seen(), committed_at_kill=committed)
    f["ok"] = _restart_ok(f, committed) and f["same_run"] and bool(f["ended_by"])
    return f


def entry_mlflow_down(rig: Rig) -> dict[str, Any]:
    """The MLflow server stopped mid-run and started again: metrics retried, the run
    finishes, no metric point lost or duplicated."""
    from pipeline.stack import stack as stack_mod

    job = Job(rig, f"{rig.storage.rsplit('/', 1)[1]}-mlflow", train_argv(rig, "mlflow_down"))
    try:
        job.wait_epoch(1)  # rank 0 logs epoch 1 right after its line: into the outage
        say(f"  stopping the MLflow server for {MLFLOW_DOWN_S:.0f} s, then starting it again")
        down_s = stack_mod.restart_mlflow(rig.stack.state_dir, pause_s=MLFLOW_DOWN_S)
        say(f"  MLflow answered again after {down_s:.0f} s")
        code = job.wait()
    finally:
        job.stop()
    rig.stack = stack_mod.load(rig.stack.state_dir)
    f = _figures(rig, "mlflow_down", job.lines(), code)
    f["mlflow_down_s"] = round(down_s, 1)
    f["ok"] = _common_ok(f) and f["epochs_redone"] == 0 and not f["orphans"]  # nothing restarted
    return f


def entry_node_killed(rig: Rig) -> dict[str, Any]:
    """SIGKILL of the second node's raylet mid-epoch: the run finishes on the head,
    restarted from the last checkpoint in S3, one MLflow run."""
    from pipeline.stack.process import Group
    from pipeline.stack.ray_cluster import alive_nodes

    record = rig.stack.state["services"]["ray_node2"]
    job = Job(rig, f"{rig.storage.rsplit('/', 1)[1]}-node", train_argv(rig, "node_killed"))
    try:
        committed = _mid_epoch_after(job, "node_killed", 2)
        raylets = [p for p in Group(record["pid"], record["start_time"]).members()
                   if Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0].endswith(b"/raylet")]
        for pid in raylets:
            os.kill(pid, signal.SIGKILL)
        say(f"  SIGKILL node2's raylet {raylets}: {committed} checkpoints")
        code = job.wait()
    finally:
        job.stop()
    f = _figures(rig, "node_killed", job.lines(), code)
    f.update(raylets_killed=len(raylets),
             nodes_alive_after=len(alive_nodes(rig.stack.endpoints["ray_dashboard"], rig.token())),
             committed_at_kill=committed)
    f["ok"] = _restart_ok(f, committed) and len(raylets) == 1
    return f


# --------------------------------------------------------------------------- running them


def run_stack_entries(names: list[str], work: Path) -> dict[str, Any]:
    """The selected stack entries on one stack (``node_killed`` last), then ``down``."""
    from pipeline.stack import stack as stack_mod

    saved = {k: os.environ.get(k) for k in JOB_ENV}
    work = work.absolute()  # the jobs run in Ray's copy of the work tree: no relative paths
    results: dict[str, Any] = {}
    try:
        try:
            rig = build_rig(work)
        except Exception as exc:  # noqa: BLE001 - no stack: every entry says why
            crashed = f"stack set-up: {type(exc).__name__}: {exc}"[:500]
            return {n: {"ok": False, "crashed": crashed} for n in STACK_ENTRIES if n in names}
        for name in [n for n in STACK_ENTRIES if n in names]:
            say(f"{name} ...")
            start = time.monotonic()
            try:
                result = globals()[f"entry_{name}"](rig)
            except Exception as exc:  # noqa: BLE001 - one entry's crash is its result
                result = {"ok": False, "crashed": f"{type(exc).__name__}: {exc}"[:500]}
            result["entry_seconds"] = round(time.monotonic() - start, 1)
            results[name] = result
            say(f"{name}: ok={result['ok']} ({result['entry_seconds']} s)")
            (work / "results.json").write_text(json.dumps(results, default=str))  # so far
    finally:
        stack_mod.down(work / "stack", quiet=True)
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value
    return results
