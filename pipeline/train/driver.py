"""Driver side of a training run: Ray start, datasets, ``TorchTrainer``, MLflow, registry.

``run_training(config)`` is what ``jobs/train_fmow.py`` calls. It
1. opens the train and validation splits of the manifest (``pipeline.read.source.open_split``:
   rows, the class list and the reader of ``config.reader``), and resolves the model's
   arguments that follow from the data (``num_classes``; ``view_size`` when
   ``data.view_size`` is set);
2. starts (or finds) the MLflow run for ``storage_path/name`` (one run per training run, also
   across a resume) and logs the resolved config as parameters and as ``config.yaml``;
3. builds the train and validation view datasets (``pipeline.train.data``);
4. runs ``pipeline.train.worker.worker_main`` on ``scaling.num_workers`` Ray Train workers with
   ``RunConfig(name, storage_path)`` (re-running the same name resumes from its last
   checkpoint) and ``FailureConfig(max_failures)`` (a dead worker restarts the group from the
   last checkpoint);
5. logs the final model (from the last checkpoint) and registers it with an alias when asked.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.protocol import PixelSource
from pipeline.train.config import TrainConfig, save_config, to_dict

WORK_TREE = Path(__file__).resolve().parents[2]


LOOPBACK = "127.0.0.1"
# Ray waits a hard-coded 30 s for a new node's raylet to register with its GCS
# (``ray._private.node``); on a loaded machine it sometimes takes longer, and a fresh start
# then succeeds: a private instance is started at most this often.
RAY_START_ATTEMPTS = 3
RAY_START_TIMEOUT = "timed out during startup"
_OUR_TOKENS: set[str] = set()  # token files ``private_token`` wrote in this process


def start_ray(address: str = "", temp_dir: str | Path | None = None, num_cpus: int | None = None,
              logging_level: str = "INFO") -> bool:
    """Connect to Ray, or start a private local instance on 127.0.0.1; True if started here.

    ``address`` (or ``RAY_ADDRESS``, which ``ray job submit`` sets for the job's driver) names a
    cluster to join. Otherwise ``address="local"`` starts a new instance even if another one runs
    on this machine (other people's Ray instances are never joined by accident). Storage
    settings (``AWS_*``) reach the workers through the per-run config, not through this call.
    ``logging_level``: of the ``ray`` logger in this process (``RayOutput.level``).

    The private instance listens on loopback only (``loopback_only``) and uses token
    authentication with a fresh token in a file only its owner can read (``private_token``).
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, log_to_driver=True, logging_level=logging_level)
        return False
    kwargs: dict[str, Any] = {"address": "local", "include_dashboard": False, "num_cpus": num_cpus,
                              "dashboard_host": LOOPBACK, "logging_level": logging_level,
                              "runtime_env": {"worker_process_setup_hook": WITHOUT_STATE_API}}
    if temp_dir is not None:
        Path(temp_dir).mkdir(parents=True, exist_ok=True)
        kwargs["_temp_dir"] = str(Path(temp_dir).resolve())
    loopback_only()
    private_token(temp_dir)
    init_local(ray, kwargs)
    return True


WITHOUT_STATE_API = "pipeline.train.driver.without_state_api"
"""The setup hook of every worker process of the private instance (``without_state_api``)."""

STATE_API_NOTICES = ("Failed to query Ray Train Controller actor state",)
"""What Ray Train's placement-group cleaner says each second when there is no State API."""


def without_state_api() -> None:
    """Worker-process setup hook of the private local instance, which runs without the
    dashboard and so without Ray's State API: Ray Train's placement-group cleaner (an actor of
    every fit) asks that API each second whether the fit's controller still lives and, when
    it cannot, warns and asks again (``STATE_API_NOTICES``: one line a second, ~750 in a
    demo-sized fit). Those warnings are dropped; its other lines stay. The instance ends with
    the job, and its placement groups with it."""
    from ray.train.v2._internal.execution.controller import placement_group_cleaner

    logger = logging.getLogger(placement_group_cleaner.__name__)
    if not any(isinstance(f, _DropNotices) for f in logger.filters):
        logger.addFilter(_DropNotices(STATE_API_NOTICES))


def init_local(ray, kwargs: dict[str, Any], attempts: int = RAY_START_ATTEMPTS) -> None:
    """``ray.init(**kwargs)`` for a new local instance, started again (at most ``attempts``
    times in all) when its node does not register within Ray's 30 s; the processes a failed
    start left behind (this process's new children: GCS, raylet, their helpers) are killed
    first. Any other error is raised at once."""
    for attempt in range(1, attempts + 1):
        before = child_pids()
        try:
            ray.init(**kwargs)
            return
        except Exception as err:
            if RAY_START_TIMEOUT not in str(err) or attempt == attempts:
                raise
            for pid in child_pids() - before:
                _kill(pid)
            ray.shutdown()
            logging.getLogger(__name__).warning(
                "Ray's node did not register within Ray's 30 s (a loaded machine?); starting "
                "it again (attempt %d of %d)", attempt + 1, attempts)


def child_pids() -> set[int]:
    """PIDs of this process's live children (from ``/proc``; empty where there is none)."""
    me, found = os.getpid(), set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == me and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


def _kill(pid: int) -> None:
    import signal

    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def loopback_only() -> None:
    """Make the next private Ray instance bind every port to 127.0.0.1.

    Ray binds its servers (GCS, raylet, driver and worker gRPC, the agents, the metrics
    exporter) to the node address, or to every interface when that address is not loopback.
    It takes the node address from ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``, read once when
    ``ray`` is first imported: a driver that imported ``ray.train`` before this call got the
    machine's address (even ``ray.init(_node_ip_address="127.0.0.1")`` is turned back into it),
    so both the variable (for the processes Ray starts) and the constant it set (for this one)
    are set here.
    """
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def private_token(directory: str | Path | None = None) -> Path | None:
    """Turn on Ray's token authentication for a private instance with a fresh random token in
    ``<new 0700 dir>/auth_token`` (mode 0600, under ``directory`` or the system temp dir);
    return its path, or None when the environment already decides (``RAY_AUTH_MODE`` other
    than ``token``, ``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH`` set).

    Without this, Ray 2.60 keeps one token for every instance in ``~/.ray/auth_token``, written
    with the default umask (0644: readable by every user of the machine). The variables set
    here reach every process Ray starts. The file is removed when this process exits.
    """
    import atexit

    user_path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token" or (
        os.environ.get("RAY_AUTH_TOKEN") or (user_path and user_path not in _OUR_TOKENS)
    ):
        return None
    # a path this process set for an earlier instance is replaced: its folder may be gone (a
    # test's temp dir), and Ray's GCS then never starts ("timed out waiting for file")
    path = write_token_file(directory)
    _OUR_TOKENS.add(str(path))
    atexit.register(_remove_token, path.parent)
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)
    _reload_ray_auth()
    return path


def write_token_file(directory: str | Path | None = None) -> Path:
    """A fresh random Ray token (64 hex characters) in ``<new dir>/auth_token``: the directory
    (under ``directory``, default the system temp dir) is mode 0700, the file 0600, created so
    (``O_EXCL``, explicit mode) that no other user can read it at any moment."""
    import secrets
    import tempfile

    if directory is not None:
        Path(directory).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="ray-token-", dir=directory))  # mode 0700
    path = folder / "auth_token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32))
    return path


def _reload_ray_auth() -> None:
    """Make this process's Ray see the new mode and token: Ray caches both on first use
    (private API of the pinned Ray 2.60, as its own ``_enable_token_auth`` does)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _remove_token(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def _say(message: str) -> None:
    print(f"[train] {message}", flush=True)


def resolve_storage(path: str) -> str:
    """Absolute local path (relative paths are taken from the current directory) or a URI."""
    return path if "://" in path else str(Path(path).resolve())


def resolve_config(config: TrainConfig, classes: list[str], coarsest: int | None = None) -> TrainConfig:
    """Fill model arguments that follow from the data: ``num_classes``, ``view_size`` and, for
    a model with a ``coarsest`` argument (Zoom-In), the pyramids' own ``coarsest``
    (``pyramids_coarsest``; None: leave the config's), so that the levels it picks per scene
    exist in every scene's pyramid whatever the ingest's ``--coarsest`` and the scene sizes."""
    overrides = dict(config.model.overrides)
    overrides.setdefault("num_classes", len(classes))
    if config.data.view_size:
        overrides.setdefault("view_size", list(config.data.view_size))
    if coarsest is not None and _takes_coarsest(config.model.name, overrides):
        if overrides.get("coarsest", coarsest) != coarsest:
            _say(f"model.overrides.coarsest {overrides['coarsest']} -> {coarsest}: the "
                 f"pyramids' coarsest level (long side, px, largest over the scenes)")
        overrides["coarsest"] = coarsest
    storage = resolve_storage(config.run.storage_path)
    return dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, overrides=overrides),
        run=dataclasses.replace(config.run, storage_path=storage),
    )


def _takes_coarsest(name: str, overrides: dict[str, Any]) -> bool:
    """Whether model ``name`` has a ``coarsest`` argument (its instance keeps the attribute)."""
    from models.registry import create_model

    return hasattr(create_model(name, **overrides), "coarsest")


def pyramids_coarsest(manifest: Any) -> int | None:
    """The largest long side (px) of any scene's coarsest level, from the manifest's
    ``level_shapes`` (Arrow table or DataFrame; no I/O): a model that halves a scene's size
    until it is at most this finds only levels every scene has (scenes ingested with a smaller
    ``--coarsest`` have more levels, never fewer). None for an empty manifest."""
    table = manifest.to_pandas() if hasattr(manifest, "to_pandas") else manifest
    sides = [max(json.loads(shapes)[-1]) for shapes in table["level_shapes"]]
    return int(max(sides)) if sides else None


@dataclass
class TrainOutcome:
    """What a finished run produced (for the job's summary and the tests).

    ``timings``: driver wall seconds (``bench/many_scenes.py``): ``open_s`` reading the
    manifest and its splits' rows, ``train_datasets_s`` / ``val_datasets_s`` dealing a split to
    the ranks and materialising its view datasets (``pipeline.train.data.rank_datasets``),
    ``fit_s`` the ``TorchTrainer.fit`` call (worker start, every epoch, checkpoints)."""

    metrics: dict[str, float]
    checkpoint_dir: str
    run_id: str | None
    model_uri: str | None = None
    registered_version: str | None = None
    classes: list[str] = field(default_factory=list)
    full_scene_bytes_per_sample: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


def _steps_per_epoch(n_train: int, workers: int, batch_size: int) -> int:
    """Ray's equal split gives every worker ``n // workers`` rows."""
    return max(1, math.ceil((n_train // workers) / batch_size))


def full_scene_bytes(manifest: Any, split: str) -> float:
    """Mean uint8 bytes of a whole level-0 scene in ``split`` (what a full-resolution CNN reads)."""
    table = manifest.to_pandas()
    rows = table[table["split"] == split]
    return float((rows["height"] * rows["width"] * rows["channels"]).mean())


def training_coarsest(manifest: Any) -> int | None:
    """The pyramids' ``coarsest`` (px), read from the first scene of the manifest (Arrow table):
    recorded with the model so that an in-memory image gets the same pyramid at predict time."""
    from pipeline.store.pyramid import pyramid_coarsest

    uris = manifest.column("uri")
    return pyramid_coarsest(uris[0].as_py()) if len(uris) else None


RAY_NOTICES = (
    "Progress bars disabled",  # Ray Data says so once per process when they are off
)
"""Ray messages dropped by default: known notices that say nothing about this run."""


@dataclass(frozen=True)
class RayOutput:
    """What Ray prints, decided once per job by ``ray_output``.

    ``level``: of the ``ray`` logger (``ray.init(logging_level=)``), Ray Data's logger and Ray
    Train's ``LoggingConfig`` ("WARNING" by default, "INFO" verbose); ``env``: variables for
    every Ray process of the run (set in this process before Ray starts, and passed to the
    workers with the loop config, so that a cluster's workers get them too)."""

    verbose: bool
    level: str
    env: dict[str, str]


def ray_output(verbose: bool = False) -> RayOutput:
    """The one place that sets how much Ray, Ray Data, Ray Train and MLflow say.

    Always: Ray Train's patch of ``print`` on its workers is off (it also logs every printed
    line, so each epoch line came out twice), Ray Data's progress bars are off (they print a
    line per update into log files), and Ray's colour codes are off unless stdout is a
    terminal. Unless ``verbose``: Ray's, Ray Data's, Ray Train's and MLflow's INFO lines are
    off (their warnings and errors stay) and Ray Data's known notices (``RAY_NOTICES``) are
    dropped. A variable the user set is left as it is. Applies what it can in this process
    (environment, Ray Data's context and logger) and returns the rest for ``ray.init``, the
    ``RunConfig`` and the workers (``apply_ray_output``)."""
    import sys

    level = "INFO" if verbose else "WARNING"
    env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    if not sys.stdout.isatty():
        env["RAY_COLOR_PREFIX"] = "0"
        _plain_dedup_marker()
    if not verbose:
        env.update({"RAY_DATA_LOG_LEVEL": level, "MLFLOW_LOGGING_LEVEL": level})
    env = {k: os.environ.get(k, v) for k, v in env.items()}
    os.environ.update(env)
    out = RayOutput(verbose=verbose, level=level, env=env)
    apply_ray_output(out)
    return out


def _plain_dedup_marker() -> None:
    """Ray's "[repeated Nx across cluster]" marker on deduplicated worker lines without its
    colour codes, which Ray adds whatever ``RAY_COLOR_PREFIX`` says (private function of the
    pinned Ray 2.60, replaced in this process: the driver prints worker output)."""
    from ray._private import ray_logging

    ray_logging._color = str


def apply_ray_output(out: RayOutput) -> Any:
    """In this process (the driver or a worker): Ray Data's progress bars off, its logger at
    ``out.level`` and, unless verbose, its known notices dropped and the root logger at
    ``out.level``; returns Ray Data's context."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    data_logger = logging.getLogger("ray.data")
    data_logger.setLevel(out.level)
    if not out.verbose:
        # Ray Train's workers log through the root logger at INFO, some of it under loggers
        # named by file path (its "Reporting training result" line per report and rank)
        logging.getLogger().setLevel(out.level)
        for handler in data_logger.handlers:
            if not any(isinstance(f, _DropNotices) for f in handler.filters):
                handler.addFilter(_DropNotices())
    return context


class _DropNotices(logging.Filter):
    """Drops the log records that start with one of ``notices`` (``RAY_NOTICES``)."""

    def __init__(self, notices: tuple[str, ...] = RAY_NOTICES):
        super().__init__()
        self.notices = notices

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.notices)


def run_training(
    config: TrainConfig,
    *,
    source_factory: Callable[[], PixelSource] | None = None,
    tracker: Any = None,
    ray_temp_dir: str | Path | None = None,
    verbose: bool = False,
) -> TrainOutcome:
    """Train ``config`` on Ray (see the module docstring); returns the outcome.

    Args:
        source_factory: picklable zero-argument callable giving the workers' ``PixelSource``
            (default: ``pipeline.read.source.ZarrSourceFactory`` of ``config.reader``).
        tracker: a ``pipeline.track.tracking`` tracker (default: ``MlflowTracker`` of
            ``config.run.mlflow_experiment`` at ``MLFLOW_TRACKING_URI`` or the work tree's SQLite).
        ray_temp_dir: Ray's temp dir when a local instance is started here.
        verbose: Ray's own INFO lines too (``ray_output``); by default only the job's lines,
            one per epoch, and Ray's warnings and errors.
    """
    output = ray_output(verbose)  # first: MLflow reads its level when imported
    from models.registry import create_model
    from pipeline.track.tracking import MlflowTracker
    from pipeline.train.quarantine import model_read_level, with_level_check

    train, val, timings = _open_splits(config)
    classes = list(train.classes)
    config = resolve_config(config, classes, pyramids_coarsest(train.manifest))
    source_factory = source_factory or train.source_factory
    model = create_model(config.model.name, **config.model.overrides)
    view_size, read_level = model.view_size, model_read_level(model)
    # scenes without a level the model reads are quarantined before the first step
    train_rows = with_level_check(train.rows, train.manifest, read_level)
    val_rows = with_level_check(val.rows, train.manifest, read_level)
    workers = config.scaling.num_workers
    if len(train_rows["key"]) < workers * config.data.batch_size:
        print(f"note: {len(train_rows['key'])} train scenes for {workers} workers x batch "
              f"{config.data.batch_size}: each worker runs a single partial batch per epoch")

    run_dir = Path(config.run.storage_path) / config.run.name if "://" not in config.run.storage_path else None
    tracker = tracker or MlflowTracker(experiment=config.run.mlflow_experiment)
    _open_run(tracker, config)
    config_path = save_config(config, (run_dir or Path(ray_temp_dir or ".")) / "config.yaml")
    tracker.log_artifact_file(config_path)

    ray_before = _ray_connected()
    try:
        result = _fit(config, source_factory, tracker, classes, view_size, train_rows, val_rows,
                      run_dir, ray_temp_dir, output, timings)
    except BaseException as err:  # stopped (SIGTERM, Ctrl-C) is KILLED, anything else FAILED
        tracker.end("KILLED" if isinstance(err, (KeyboardInterrupt, SystemExit)) else "FAILED")
        _leave_ray(ray_before)
        raise
    try:
        return _finish(config, result, tracker, classes, train.manifest, timings)
    finally:
        _leave_ray(ray_before)


def _open_splits(config: TrainConfig) -> tuple[Any, Any, dict[str, float]]:
    """The train and validation ``SplitData`` of the config's manifest, and ``timings`` with
    the seconds it took to read them (``open_s``)."""
    from pipeline.read.source import open_split

    began = time.perf_counter()
    train = open_split(config.data.manifest, config.data.train_split, config.reader,
                       config.data.limit)
    val = train.sibling(config.data.val_split)
    return train, val, {"open_s": time.perf_counter() - began}


def _open_run(tracker: Any, config: TrainConfig) -> None:
    """Mark KILLED the runs that drivers killed outright left RUNNING (``mark_orphans``), then
    find or create this training run's MLflow run (RUNNING) with the config as params."""
    for run_id in tracker.mark_orphans():
        _say(f"MLflow run {run_id} was left RUNNING by a driver that is gone: marked KILLED")
    tracker.start(config.run.run_key, params=to_dict(config), run_name=config.run.name)


def _ray_connected() -> bool:
    import ray

    return ray.is_initialized()


def _leave_ray(was_connected: bool) -> None:
    """Disconnect from (and so stop) a Ray this run started, so that a caller in the same
    process (a test, a notebook) finds no Ray left behind; a Ray it found stays."""
    import ray

    if not was_connected and ray.is_initialized():
        ray.shutdown()



def _fit(config, source_factory, tracker, classes, view_size, train_rows, val_rows, run_dir,
         ray_temp_dir, output, timings):
    """Start Ray if needed, build the datasets, run the ``TorchTrainer``; its ``Result``.
    ``timings`` (a dict) gets the seconds of the datasets and of the fit (``TrainOutcome``)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.train import data
    from pipeline.train.process_group import NodeBoundTorchConfig
    from pipeline.train.worker import worker_main

    workers = config.scaling.num_workers
    start_ray(config.run.ray_address, temp_dir=ray_temp_dir,
              num_cpus=max(os.cpu_count() or 1, math.ceil(workers * config.scaling.cpus_per_worker) + 1),
              logging_level=output.level)
    context = apply_ray_output(output)
    # each rank's dataset keeps its rows' order, so the seeded local shuffle sees one order
    context.execution_options.preserve_order = True
    env = {**data.reader_env(), **output.env}
    _say(f"reading the views of {len(train_rows['key'])} train and {len(val_rows['key'])} val scenes")
    view_factory = getattr(source_factory, "in_process", lambda: source_factory)()
    datasets = _view_datasets(config, {"train": train_rows, "val": val_rows}, view_factory,
                              view_size, env, timings)
    loop_config = {
        "config": to_dict(config),
        "classes": classes,
        "steps_per_epoch": _steps_per_epoch(len(train_rows["key"]), workers, config.data.batch_size),
        "source_factory": source_factory,
        "tracker": tracker,
        "env": env,
        "ray_output": output,
        "crash_marker": str((run_dir or Path(".")) / "crash.marker"),
    }
    trainer = TorchTrainer(
        worker_main,
        train_loop_config=loop_config,
        torch_config=NodeBoundTorchConfig(),  # the DDP store on the node's address only
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers,
            use_gpu=config.scaling.use_gpu,
            resources_per_worker={"CPU": config.scaling.cpus_per_worker},
            placement_strategy=config.scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=config.run.name,
            storage_path=config.run.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=config.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            logging_config=ray.train.LoggingConfig(log_level=output.level),
        ),
        datasets=datasets,
        # each rank's dataset is made on the driver (rank_datasets): Ray splits nothing, so
        # which worker sees which scene does not depend on timing
        dataset_config=ray.train.DataConfig(datasets_to_split=[], execution_options=_in_order()),
    )
    _say(f"training {config.model.name} on {workers} workers for {config.optim.epochs} epochs "
         f"(run {config.run.name!r}, checkpoints in {config.run.storage_path})")
    return _timed_fit(trainer, timings)


def _timed_fit(trainer: Any, timings: dict[str, float]) -> Any:
    """``trainer.fit()``; its wall seconds go to ``timings["fit_s"]``, also when it raises."""
    began = time.perf_counter()
    try:
        return trainer.fit()
    finally:
        timings["fit_s"] = time.perf_counter() - began


def _view_datasets(config: TrainConfig, rows: dict[str, Any], view_factory: Any,
                   view_size: tuple[int, int], env: dict[str, str],
                   timings: dict[str, float]) -> dict[str, Any]:
    """The per-rank view datasets of the ``train`` and ``val`` rows
    (``pipeline.train.data.rank_datasets``; train dealt with the data seed, val in order);
    ``timings`` gets each split's seconds (``<split>_datasets_s``)."""
    from pipeline.train import data

    seeds = {"train": config.data.data_seed(config.run.seed), "val": None}
    datasets: dict[str, Any] = {}
    for split, split_rows in rows.items():
        began = time.perf_counter()
        datasets |= data.rank_datasets(split, split_rows, config.scaling.num_workers,
                                       view_factory, view_size, env, seed=seeds[split])
        timings[f"{split}_datasets_s"] = time.perf_counter() - began
    return datasets


def _in_order() -> Any:
    """Ray Train's default ingest options (``DataConfig.default_ingest_options``: the current
    Ray Data context's limits) with ``preserve_order``: each rank iterates its dataset in its
    rows' order, so the seeded local shuffle gives the same batches each run. Built here
    without the deprecated ``exclude_resources``, which Ray's helper passes and warns about."""
    from ray.data import ExecutionOptions
    from ray.data.context import DataContext

    current = DataContext.get_current().execution_options
    return ExecutionOptions(resource_limits=current.resource_limits, preserve_order=True,
                            verbose_progress=current.verbose_progress)


def _tidy_checkpoints(config: TrainConfig) -> None:
    """Remove the run's checkpoint folders that Ray Train no longer lists (a failure of this
    tidying is reported, never fatal: the run itself has finished)."""
    from pipeline.train.checkpoint import remove_orphan_checkpoints

    try:
        removed = remove_orphan_checkpoints(f"{config.run.storage_path.rstrip('/')}/{config.run.name}")
    except Exception as err:  # noqa: BLE001 - a leftover folder must not fail a finished run
        _say(f"warning: could not tidy the run's checkpoints: {err}")
        return
    if removed:
        _say(f"removed {len(removed)} checkpoint folder(s) Ray Train no longer lists: {removed}")


def _finish(config: TrainConfig, result: Any, tracker: Any, classes: list[str], manifest: Any,
            timings: dict[str, float]) -> TrainOutcome:
    """Log the final model, register it if asked, close the MLflow run; ``timings`` go into
    the outcome as they are."""
    from pipeline.train.checkpoint import load_model, read_meta

    _say("training finished; logging the final model")
    _tidy_checkpoints(config)
    if result.checkpoint is None:
        tracker.end("FAILED")
        raise RuntimeError(f"run {config.run.name!r} finished without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        meta = read_meta(directory)
        model = load_model(directory)
        checkpoint_dir = result.checkpoint.path
    metrics = {k: float(v) for k, v in (result.metrics or meta.get("metrics") or {}).items()}
    model_uri = tracker.log_model(
        model, classes=classes, metadata={"val_accuracy": metrics.get("val/accuracy"),
                                          "epochs": meta.get("epoch"), "run": config.run.name,
                                          "pyramid_coarsest": training_coarsest(manifest)},
    )
    version = None
    if config.run.register_name and model_uri:
        version = tracker.register(model_uri, config.run.register_name, alias=config.run.register_alias)
    tracker.end("FINISHED")
    return TrainOutcome(
        metrics=metrics,
        checkpoint_dir=str(checkpoint_dir),
        run_id=tracker.run_id,
        model_uri=model_uri,
        registered_version=version,
        classes=classes,
        full_scene_bytes_per_sample=full_scene_bytes(manifest, config.data.train_split),
        timings=timings,
    )
