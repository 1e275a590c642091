"""Experiment tracking and the model registry: the ONLY module of the project that imports mlflow.

Tracking is a sink: training code computes numbers and hands them to a ``Tracker``; only rank 0
of a Ray Train run, or the driver, holds a real one (``MlflowTracker``), every other rank and
every unit test that does not care holds a ``NullTracker``. ``mlflow`` is imported inside
functions so that ``import pipeline.track.tracking`` stays cheap.

Where runs go:
- ``MLFLOW_TRACKING_URI`` when set (e.g. ``http://127.0.0.1:5000`` for the local stack of
  ``infra/local``, a PostgreSQL-backed server at scale);
- otherwise ``sqlite:///<work tree>/mlflow.db`` (``default_tracking_uri``).
For a ``sqlite:///DIR/NAME.db`` URI the artifacts of every experiment that this module creates go
to ``DIR/mlruns/<experiment name>`` (MLflow itself would use ``./mlruns`` relative to whatever the
current directory happens to be). With a server, the server decides (``--artifacts-destination``).

One MLflow run per training run: ``MlflowTracker.start(run_key, ...)`` finds the run whose tag
``pipeline.run_key`` equals ``run_key`` (searched by its hash) and reopens it, or creates it.
Use a key that names the training run uniquely and survives a resume and a worker restart, e.g.
``f"{storage_path}/{name}"``
of Ray Train's ``RunConfig``. The driver may also create the run and pass ``run_id`` to the
workers, where ``MlflowTracker.attach(run_id)`` logs into it.

Typical use::

    tracker = MlflowTracker(experiment="fmow")            # or NullTracker() on ranks > 0
    run_id = tracker.start(run_key, params=config_dict)   # find-or-create, status RUNNING
    tracker.log_artifact_file("run/config.yaml")
    for epoch in range(epochs):
        tracker.log_metrics({"train/loss": 0.7, "val/accuracy": 0.6}, step=epoch)
        tracker.log_image(png_bytes, f"val_scenes/epoch_{epoch:03d}/{scene}.png")
        tracker.log_confusion(matrix, class_names, step=epoch)
    model_uri = tracker.log_model(model, classes=class_names)
    version = tracker.register(model_uri, "fmow-demo", alias="champion")
    tracker.end("FINISHED")
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

WORK_TREE = Path(__file__).resolve().parents[2]
RUN_KEY_TAG = "pipeline.run_key"
RUN_KEY_HASH_TAG = "pipeline.run_key_sha256"
DRIVER_TAG = "pipeline.driver"  # JSON {"host", "pid", "started"} of the process that started the run
ENDED_BY_TAG = "pipeline.ended_by"  # why a run whose driver vanished was marked KILLED
# MLflow 3 limits (mlflow/utils/validation.py): 6000 chars per param value, 100 params per batch.
MAX_PARAM_VALUE = 6000
PARAMS_PER_BATCH = 100
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
NO_PICKLE_ENV = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
# A tracking server that does not answer (restarted, its database restarted) is waited for this
# long by a tracker's logging calls, on top of MLflow's own retries (about 2 min), then they fail.
OUTAGE_S = 600.0
# MlflowException codes that say the request itself is wrong: never retried.
NOT_TRANSIENT = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
                 "BAD_REQUEST", "INVALID_STATE", "PERMISSION_DENIED", "UNAUTHENTICATED",
                 "ENDPOINT_NOT_FOUND"}
# Inference params of the logged model (``Predictor.predict_any``) and their defaults.
PREDICT_PARAMS = {"seed": 0, "batch_size": 8}


def run_key_hash(run_key: str) -> str:
    """Hex SHA-256 of a run key: the tag that ``MlflowTracker`` searches runs by."""
    return hashlib.sha256(run_key.encode("utf-8")).hexdigest()


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<work tree>/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{WORK_TREE / 'mlflow.db'}"


def sqlite_artifact_root(tracking_uri: str, experiment: str) -> str | None:
    """``DIR/mlruns/<experiment>`` for ``sqlite:///DIR/NAME.db``; None for other backends."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    db_path = Path(tracking_uri[len(prefix) :].split("?", 1)[0])
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment) or "experiment"
    return (db_path.parent / "mlruns" / safe).resolve().as_uri()


def flatten_params(config: Any, prefix: str = "") -> dict[str, str]:
    """Flatten a (nested) config into dotted keys with string values, as MLflow params.

    Accepts dataclass instances and mappings (nested freely); lists, tuples and other leaves are
    written as JSON when possible, else ``str``. ``{"a": {"b": 1}, "c": [1, 2]}`` ->
    ``{"a.b": "1", "c": "[1, 2]"}``. Values longer than MLflow's limit are cut with ``...``.
    """
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    if isinstance(config, Mapping):
        flat: dict[str, str] = {}
        for key, value in config.items():
            flat.update(flatten_params(value, f"{prefix}{key}."))
        if not config and prefix:
            flat[prefix[:-1]] = "{}"
        return flat
    value = _param_text(config)
    if len(value) > MAX_PARAM_VALUE:
        value = value[: MAX_PARAM_VALUE - 3] + "..."
    return {prefix[:-1]: value}


def _param_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Path):
        return str(value)
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return str(value)


class Tracker:
    """Interface of a tracking sink; this base class is also the null tracker (does nothing).

    Every method is safe to call on every rank; only ``MlflowTracker`` records anything.
    """

    run_id: str | None = None

    def start(
        self,
        run_key: str,
        params: Any = None,
        tags: Mapping[str, str] | None = None,
        run_name: str | None = None,
    ) -> str | None:
        """Find-or-create the run tagged ``run_key``, mark it RUNNING, log ``params``.

        Args:
            run_key: unique, stable name of the training run (e.g. ``storage_path/name``).
            params: config as a (nested) mapping or dataclass, logged flattened to dotted keys.
            tags: extra run tags.
            run_name: display name of a newly created run (default: last part of ``run_key``).
        Returns the MLflow run id (None for the null tracker).
        """
        return None

    def attach(self, run_id: str) -> None:
        """Log into an existing run (created by the driver) without changing its status."""

    def mark_orphans(self) -> list[str]:
        """Mark KILLED the RUNNING runs of this experiment whose driver is known to be gone
        (``driver_alive`` False); returns their ids."""
        return []

    def log_params(self, params: Any) -> None:
        """Log a (nested) config as flattened params; see ``MlflowTracker.log_params``."""

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values converted with ``str``)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log scalar metrics at ``step`` (the epoch, for per-epoch metrics)."""

    def log_artifact_file(self, path: str | os.PathLike, subdir: str | None = None) -> None:
        """Copy the local file ``path`` into the run's artifacts, under ``subdir`` if given."""

    def log_bytes(self, data: bytes, name: str) -> None:
        """Store ``data`` as the artifact ``name`` (a relative path like ``a/b/file.bin``)."""

    def log_image(self, png_bytes: bytes, name: str) -> None:
        """Store PNG bytes as the artifact ``name`` (e.g. ``val_scenes/epoch_003/x.png``)."""
        self.log_bytes(png_bytes, name)

    def log_text(self, text: str, name: str) -> None:
        """Store ``text`` (UTF-8) as the artifact ``name``."""
        self.log_bytes(text.encode("utf-8"), name)

    def log_json(self, obj: Any, name: str) -> None:
        """Store ``obj`` as indented JSON in the artifact ``name``."""
        self.log_text(json.dumps(obj, indent=2, sort_keys=True), name)

    def log_confusion(
        self, matrix: Any, class_names: Sequence[str] | None, step: int, prefix: str = "confusion"
    ) -> None:
        """Log a confusion matrix as ``{prefix}/epoch_{step:03d}.png``, ``.csv`` and ``.json``.

        Args:
            matrix: (C, C) counts, rows = true class, columns = predicted class.
            class_names: C names (None: the class indices).
            step: the epoch.
        """

    def log_model(
        self,
        model: Any,
        classes: Sequence[str] | None = None,
        name: str = "model",
        metadata: Mapping[str, Any] | None = None,
    ) -> str | None:
        """Log ``model`` in the project's format (``pipeline.track.packaging``); returns its model URI.

        Args:
            model: an ``AttentionModel`` built by ``models.create_model`` (has ``.spec``);
                a DDP wrapper is unwrapped.
            classes: class names in label order (stored with the model, used in predictions).
            name: name of the logged model.
            metadata: extra JSON-serialisable facts stored in ``spec.json`` (e.g. val accuracy).
        Returns ``models:/<model id>`` (None for the null tracker).
        """
        return None

    def register(self, model_uri: str, name: str, alias: str | None = None) -> str | None:
        """Register ``model_uri`` as a new version of ``name``; point ``alias`` at it if given.

        Returns the version number as a string (None for the null tracker).
        """
        return None

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run ``FINISHED``, ``FAILED`` or ``KILLED``."""


NullTracker = Tracker


class MlflowTracker(Tracker):
    """A ``Tracker`` writing to MLflow through ``MlflowClient`` with explicit run ids.

    No fluent (global active-run) state is used, so the object is safe in threads and cheap to
    send to Ray workers: it pickles as its tracking URI, experiment name and run id only.
    """

    def __init__(
        self,
        experiment: str = "attention-pipeline",
        tracking_uri: str | None = None,
        run_id: str | None = None,
    ):
        self.experiment = experiment
        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.run_id = run_id
        self._client_cache = None
        self._logged: dict[str, set[int]] | None = None  # (key -> steps) the run has

    def __getstate__(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment,
            "tracking_uri": self.tracking_uri,
            "run_id": self.run_id,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._client_cache = None
        self._logged = None

    @property
    def client(self):
        """The ``mlflow.MlflowClient`` for this tracking URI (created on first use)."""
        if self._client_cache is None:
            self._client_cache = mlflow_client(self.tracking_uri)
        return self._client_cache

    def experiment_id(self) -> str:
        """Id of ``self.experiment``, created when missing (artifacts beside a sqlite DB)."""
        experiment = self.client.get_experiment_by_name(self.experiment)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(
                self.experiment,
                artifact_location=sqlite_artifact_root(self.tracking_uri, self.experiment),
            )
        except Exception:  # created concurrently by another process: use theirs
            experiment = self.client.get_experiment_by_name(self.experiment)
            if experiment is None:
                raise
            return experiment.experiment_id

    def runs_with_key(self, run_key: str) -> list[str]:
        """Ids of the active runs tagged with ``run_key``, oldest first.

        Searched by the key's SHA-256 (tag ``pipeline.run_key_sha256``): MLflow's filter
        strings have no escapes, so a key holding quotes could not be matched exactly.
        """
        runs = self.client.search_runs(
            [self.experiment_id()],
            filter_string=f"tags.`{RUN_KEY_HASH_TAG}` = '{run_key_hash(run_key)}'",
            order_by=["attributes.start_time ASC"],
        )
        return [r.info.run_id for r in runs]

    def find_run(self, run_key: str) -> str | None:
        """Run id of the (oldest) run tagged ``pipeline.run_key == run_key``, or None."""
        runs = self.runs_with_key(run_key)
        return runs[0] if runs else None

    def start(self, run_key, params=None, tags=None, run_name=None):
        self.run_id = self.find_run(run_key)
        tags = {DRIVER_TAG: json.dumps(driver_identity()), **(tags or {})}
        if self.run_id is None:
            all_tags = {
                RUN_KEY_TAG: run_key,
                RUN_KEY_HASH_TAG: run_key_hash(run_key),
                **tags,
            }
            run = self.client.create_run(
                self.experiment_id(),
                tags={k: str(v) for k, v in all_tags.items()},
                run_name=run_name or Path(run_key.rstrip("/")).name or None,
            )
            self.run_id = run.info.run_id
        else:
            self.client.update_run(self.run_id, status="RUNNING")
            self.set_tags(tags)
        if params is not None:
            self.log_params(params)
        return self.run_id

    def attach(self, run_id):
        self.client.get_run(run_id)  # fails loudly on a wrong id
        self.run_id = run_id

    def mark_orphans(self):
        """A driver killed outright (SIGKILL, its node lost) never ends its run: the next
        start in the experiment marks it KILLED, with the tag ``pipeline.ended_by`` saying why.
        Only drivers of this host are judged (``driver_alive``); runs without the tag are left."""
        if self.client.get_experiment_by_name(self.experiment) is None:
            return []
        marked = []
        for run in self.client.search_runs([self.experiment_id()],
                                           filter_string="attributes.status = 'RUNNING'"):
            try:
                driver = json.loads(run.data.tags.get(DRIVER_TAG) or "null")
            except ValueError:
                continue
            if not isinstance(driver, dict) or driver_alive(driver) is not False:
                continue
            me = driver_identity()
            self.client.set_tag(run.info.run_id, ENDED_BY_TAG,
                                f"driver {driver.get('host')}:{driver.get('pid')} gone; marked "
                                f"KILLED by {me['host']}:{me['pid']} at "
                                f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
            self.client.set_terminated(run.info.run_id, status="KILLED")
            marked.append(run.info.run_id)
        return marked

    def _require_run(self) -> str:
        if self.run_id is None:
            raise RuntimeError("MlflowTracker: call start(run_key) or attach(run_id) first")
        return self.run_id

    def log_params(self, params):
        """Log flattened params. Keys already in the run keep their value (MLflow params are
        immutable): a resumed run whose config changed records each new value as the tag
        ``param_changed.<key>`` instead of failing."""
        from mlflow.entities import Param

        run_id = self._require_run()
        flat = flatten_params(params)
        existing = self.client.get_run(run_id).data.params
        new = [Param(k, v) for k, v in flat.items() if k not in existing]
        changed = {
            f"param_changed.{k}": v for k, v in flat.items() if k in existing and existing[k] != v
        }
        for i in range(0, len(new), PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=new[i : i + PARAMS_PER_BATCH])
        if changed:
            self.set_tags(changed)

    def set_tags(self, tags):
        from mlflow.entities import RunTag

        run_id = self._require_run()
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            batch = items[i : i + PARAMS_PER_BATCH]
            self._retry(lambda batch=batch: self.client.log_batch(run_id, tags=batch))

    def log_metrics(self, metrics, step):
        """Log each metric at ``step`` once per run: a (key, step) the run already has is not
        sent again (a worker restarted after logging an epoch redoes it; a request retried after
        the server went away may have arrived). Waits out a server outage (``OUTAGE_S``)."""
        from mlflow.entities import Metric

        run_id = self._require_run()
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()
                 if not math.isnan(float(v))]  # MLflow stores NaN, but charts choke on it
        fresh = True
        while items:
            try:
                items = self._unlogged(run_id, items, refresh=not fresh)
                for i in range(0, len(items), 1000):
                    self.client.log_batch(run_id, metrics=items[i : i + 1000])
                for m in items:
                    self._logged.setdefault(m.key, set()).add(m.step)
                return
            except Exception as err:  # noqa: BLE001 - classified by _wait_out
                fresh = _wait_out(err, now)

    def _unlogged(self, run_id: str, items: list[Any], refresh: bool) -> list[Any]:
        """The points of ``items`` whose (key, step) the run does not have yet; the run's steps
        are asked once per key (again when ``refresh``: a failed request may have arrived)."""
        self._logged = {} if self._logged is None else self._logged
        for key in {m.key for m in items}:
            if refresh or key not in self._logged:
                self._logged[key] = {m.step for m in self.client.get_metric_history(run_id, key)}
        return [m for m in items if m.step not in self._logged[m.key]]

    def _retry(self, call: Any) -> Any:
        """``call()``, called again while the server is away (``_wait_out``): for requests
        that may safely arrive twice (artifacts overwrite, tags and status are set)."""
        since = int(time.time() * 1000)
        while True:
            try:
                return call()
            except Exception as err:  # noqa: BLE001 - classified by _wait_out
                _wait_out(err, since)

    def log_artifact_file(self, path, subdir=None):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"MlflowTracker.log_artifact_file: no file at {path}")
        run_id = self._require_run()
        self._retry(lambda: self.client.log_artifact(run_id, str(path), artifact_path=subdir))

    def log_bytes(self, data, name):
        run_id = self._require_run()
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"artifact name must be a relative path without '..', got {name!r}")
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / rel.name
            local.write_bytes(data)
            parent = None if rel.parent.as_posix() == "." else rel.parent.as_posix()
            self._retry(lambda: self.client.log_artifact(run_id, str(local), artifact_path=parent))

    def log_confusion(self, matrix, class_names, step, prefix="confusion"):
        from pipeline.track import pictures as visualize

        base = f"{prefix}/epoch_{int(step):03d}"
        self.log_image(visualize.confusion_png(matrix, class_names), f"{base}.png")
        self.log_text(visualize.confusion_csv(matrix, class_names), f"{base}.csv")
        self.log_json(visualize.confusion_dict(matrix, class_names), f"{base}.json")

    def log_model(self, model, classes=None, name="model", metadata=None):
        from pipeline.track import packaging

        run_id = self._require_run()
        with tempfile.TemporaryDirectory() as tmp:
            files = packaging.write_model_files(model, tmp, classes=classes, metadata=metadata)
            model_uri = log_pyfunc_model(
                self.tracking_uri, run_id, name, files, packaging.pip_requirements()
            )
        self.set_tags({"pipeline.model_uri": model_uri})
        return model_uri

    def register(self, model_uri, name, alias=None):
        return register_model(self.tracking_uri, model_uri, name, alias, run_id=self.run_id)

    def end(self, status="FINISHED"):
        if status not in RUN_STATUSES:
            raise ValueError(f"run status must be one of {RUN_STATUSES}, got {status!r}")
        if self.run_id is not None:
            self._retry(lambda: self.client.set_terminated(self.run_id, status=status))


def driver_identity() -> dict[str, Any]:
    """This process as the driver of a run: host name, pid and start time (clock ticks since
    boot, ``/proc``), which together tell a live driver from a later process with the same pid."""
    import socket

    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _proc_start(os.getpid())[1]}


def driver_alive(driver: Mapping[str, Any]) -> bool | None:
    """Whether the driver ``driver_identity`` described still runs: True or False on its own
    host, None elsewhere (a process of another machine cannot be seen from here)."""
    import socket

    if driver.get("host") != socket.gethostname():
        return None
    try:
        state, started = _proc_start(int(driver["pid"]))
    except (OSError, KeyError, TypeError, ValueError):
        return False
    return state != "Z" and started == driver.get("started")


def _proc_start(pid: int) -> tuple[str, int]:
    """(state letter, start time in clock ticks since boot) of ``pid`` from ``/proc``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return fields[0], int(fields[19])


def _wait_out(err: Exception, since_ms: int) -> bool:
    """After a failed logging call begun at ``since_ms`` (ms since the epoch): re-raise ``err``
    unless it is transient (the server unreachable or failing, not a wrong request) and
    ``OUTAGE_S`` has not passed; else sleep a little and return False (call again)."""
    from mlflow.exceptions import MlflowException

    code = getattr(err, "error_code", None) if isinstance(err, MlflowException) else None
    if code in NOT_TRANSIENT or not isinstance(err, (MlflowException, OSError)):
        raise err
    waited = time.time() - since_ms / 1000
    if waited > OUTAGE_S:
        raise err
    print(f"[track] the tracking server failed ({str(err).splitlines()[0][:160]}); "
          f"trying again ({waited:.0f} s of {OUTAGE_S:.0f})", flush=True)
    time.sleep(min(10.0, 1.0 + waited / 10))
    return False


def make_tracker(enabled: bool, experiment: str = "attention-pipeline", **kwargs: Any) -> Tracker:
    """``MlflowTracker(experiment, **kwargs)`` when ``enabled`` (rank 0, driver), else a null one."""
    return MlflowTracker(experiment, **kwargs) if enabled else NullTracker()


# --- plain functions over MLflow (used by the tracker, packaging, retraining and predict) -------


def mlflow_client(tracking_uri: str | None = None):
    """An ``mlflow.MlflowClient`` for ``tracking_uri`` (default ``default_tracking_uri()``).

    The process-wide tracking and registry URIs are set too, because MLflow's model logging and
    loading (``Model.log``, ``pyfunc.load_model``) read them rather than a client's.
    """
    import mlflow

    uri = tracking_uri or default_tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def log_pyfunc_model(
    tracking_uri: str,
    run_id: str,
    name: str,
    files: Mapping[str, str],
    pip_requirements: Sequence[str],
) -> str:
    """Log a models-from-code pyfunc model whose artifacts are ``files`` (name -> local path).

    The model's code is ``pipeline/track/pyfunc_entry.py`` (a file path, so MLflow stores the code
    file, not a cloudpickle of an object); loading runs that file, which builds the predictor
    from the artifacts (safetensors weights + JSON spec). Returns ``models:/<model id>``.
    """
    import mlflow
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    client = mlflow_client(tracking_uri)
    # Only the inference params are declared (MLflow drops undeclared ones); no input schema,
    # because inputs are URIs, images or DataFrames that the predictor checks itself.
    signature = ModelSignature(
        inputs=None,
        params=ParamSchema([ParamSpec(k, "long", v) for k, v in PREDICT_PARAMS.items()]),
    )
    # Model.log files the logged model under the *active* experiment, not the run's.
    mlflow.set_experiment(experiment_id=client.get_run(run_id).info.experiment_id)
    with warnings.catch_warnings():
        # An input example would be run through the model at logging time; ours need pixels.
        warnings.filterwarnings("ignore", message=".*input example was not provided")
        info = mlflow.models.Model.log(
            artifact_path=None,
            name=name,
            flavor=mlflow.pyfunc,
            run_id=run_id,
            python_model=str(Path(__file__).with_name("pyfunc_entry.py")),
            artifacts=dict(files),
            pip_requirements=list(pip_requirements),
            signature=signature,
        )
    return info.model_uri


def register_model(
    tracking_uri: str | None,
    model_uri: str,
    name: str,
    alias: str | None = None,
    run_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> str:
    """Register ``model_uri`` as a new version of ``name`` (created if missing).

    Points ``alias`` (e.g. ``champion``) at the new version when given; aliases replace stages in
    MLflow 3. Returns the version number as a string.
    """
    import mlflow

    mlflow_client(tracking_uri)
    version = mlflow.register_model(
        model_uri, name, tags={k: str(v) for k, v in (tags or {}).items()}
    )
    client = mlflow_client(tracking_uri)
    if run_id is not None:
        client.set_model_version_tag(name, version.version, "pipeline.run_id", run_id)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def set_alias(tracking_uri: str | None, name: str, alias: str, version: str) -> None:
    """Point ``models:/name@alias`` at ``version``."""
    mlflow_client(tracking_uri).set_registered_model_alias(name, alias, str(version))


def alias_version(tracking_uri: str | None, name: str, alias: str) -> str | None:
    """The version that ``name@alias`` points at, or None (no such model or alias)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(mlflow_client(tracking_uri).get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def set_version_tags(
    tracking_uri: str | None, name: str, version: str, tags: Mapping[str, Any]
) -> None:
    """Set tags on model version ``name/version`` (values converted with ``str``)."""
    client = mlflow_client(tracking_uri)
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, str(value))


def version_tags(tracking_uri: str | None, name: str, version: str) -> dict[str, str]:
    """Tags of model version ``name/version``."""
    return dict(mlflow_client(tracking_uri).get_model_version(name, str(version)).tags)


def download_model(model_uri: str, dst: str | os.PathLike, tracking_uri: str | None = None) -> Path:
    """Download the files of ``model_uri`` (``models:/NAME@alias``, ``models:/NAME/3``,
    ``models:/<model id>``, ``runs:/...``) into ``dst``; returns the local model directory."""
    import mlflow

    mlflow_client(tracking_uri)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))


def download_model_files(
    model_uri: str, dst: str | os.PathLike, tracking_uri: str | None = None
) -> dict[str, str]:
    """Download ONLY the weights (safetensors) and ``spec.json`` of a logged or registered model
    into ``dst``; returns ``{"weights": path, "spec": path}`` (``packaging.Predictor.from_files``).

    Nothing else stored with the model (its pyfunc entry file, ``MLmodel``, any file planted
    beside them) is downloaded, so nothing of it can run. ``model_uri``: ``models:/NAME@alias``,
    ``models:/NAME/VERSION``, ``models:/<model id>`` (what ``log_model`` returns), ``runs:/...``.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.track.packaging import SPEC_FILE, WEIGHTS_FILE

    client = mlflow_client(tracking_uri)
    root = model_uri.rstrip("/")
    if re.fullmatch(r"models:/m-[0-9a-f]+", root):  # a logged model id, not a registered name
        root = client.get_logged_model(root.removeprefix("models:/")).artifact_location
    files = {}
    for key, filename in (("spec", SPEC_FILE), ("weights", WEIGHTS_FILE)):
        try:
            files[key] = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{root}/artifacts/{filename}", dst_path=str(dst))
        except (MlflowException, OSError) as err:
            raise FileNotFoundError(f"{model_uri}: cannot download {filename}: {err}") from err
    return files


def load_predictor(model_uri: str, tracking_uri: str | None = None, **kwargs: Any):
    """``packaging.Predictor`` of a registered model, rebuilt with the INSTALLED project's code
    from its weights and spec only (``download_model_files``; the spec's project version must
    match the installed major.minor). No code or pickle from the artifact store runs. ``kwargs``
    go to the predictor (``seed``, ``source_factory``)."""
    from pipeline.track.packaging import Predictor

    with tempfile.TemporaryDirectory() as tmp:
        return Predictor.from_files(download_model_files(model_uri, tmp, tracking_uri), **kwargs)


def load_pyfunc(model_uri: str, tracking_uri: str | None = None):
    """``mlflow.pyfunc.load_model(model_uri)`` with pickle deserialisation switched off.

    Our models load by running their code file and reading safetensors + JSON; a model that
    would need cloudpickle (not one of ours) is refused instead of executed. MLflow still runs
    the STORED copy of the code file (models from code): whoever can write to the artifact store
    can run code here. The project's jobs use ``load_predictor`` instead, which runs none.
    """
    import mlflow

    mlflow_client(tracking_uri)
    previous = os.environ.get(NO_PICKLE_ENV)
    os.environ[NO_PICKLE_ENV] = "false"
    try:
        return mlflow.pyfunc.load_model(model_uri)
    finally:
        if previous is None:
            os.environ.pop(NO_PICKLE_ENV, None)
        else:
            os.environ[NO_PICKLE_ENV] = previous


@dataclasses.dataclass(frozen=True, slots=True)
class ModelRef:
    """A model URI pinned to what it named when it was resolved.

    Attributes:
        requested: the URI as given (``models:/NAME@alias``, ``models:/NAME/3``, ...).
        uri: ``models:/NAME/VERSION`` for a registered model (an alias moved later does not
            change what this URI loads), else ``requested`` unchanged.
        name: the registered model's name, or None.
        version: the version number as a string, or None (not a registered model).
    """

    requested: str
    uri: str
    name: str | None = None
    version: str | None = None


def resolve_model(model_uri: str, tracking_uri: str | None = None) -> ModelRef:
    """Pin ``models:/NAME@alias`` and ``models:/NAME/VERSION`` to one registered version;
    other URIs (``models:/<model id>``, ``runs:/...``) come back unpinned.

    Raises ``LookupError`` naming the model when the alias or version does not exist.
    """
    from mlflow.exceptions import MlflowException

    rest = model_uri[len("models:/"):] if model_uri.startswith("models:/") else None
    if rest is None or not ("@" in rest or rest.rpartition("/")[2].isdigit()):
        return ModelRef(model_uri, model_uri)
    if "@" in rest:
        name, alias = rest.split("@", 1)
        version = alias_version(tracking_uri, name, alias)
        if version is None:
            where = tracking_uri or default_tracking_uri()
            raise LookupError(f"no registered model {name}@{alias} at {where}")
    else:
        name, _, version = rest.rpartition("/")
        try:
            mlflow_client(tracking_uri).get_model_version(name, version)
        except MlflowException as err:
            raise LookupError(f"no registered model {name} version {version}: {err}") from err
    return ModelRef(model_uri, f"models:/{name}/{version}", name, str(version))


@functools.cache
def _pyfunc_model_class() -> type:
    import mlflow.pyfunc

    class AttentionPyfuncModel(mlflow.pyfunc.PythonModel):
        """MLflow adapter around ``pipeline.track.packaging.Predictor`` (built in ``load_context``)."""

        # MLflow would wrap predict to validate/convert inputs against type hints; the
        # predictor checks its own inputs (numpy images, dicts of URIs, DataFrames).
        _skip_type_hint_validation = True

        def __init__(self) -> None:
            self.predictor = None

        def load_context(self, context) -> None:
            from pipeline.track.packaging import Predictor

            self.predictor = Predictor.from_files(context.artifacts)

        def predict(self, context, model_input, params=None):
            if self.predictor is None:
                self.load_context(context)
            return self.predictor.predict_any(model_input, params)

    return AttentionPyfuncModel


def set_pyfunc_model() -> None:
    """Called by ``pipeline/track/pyfunc_entry.py`` when MLflow runs it: declare the pyfunc model."""
    import mlflow.models

    mlflow.models.set_model(_pyfunc_model_class()())


def run_info(run_id: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """Status, params, latest metrics, tags and artifact URI of a run, as plain dicts."""
    run = mlflow_client(tracking_uri).get_run(run_id)
    return {
        "run_id": run.info.run_id,
        "status": run.info.status,
        "artifact_uri": run.info.artifact_uri,
        "params": dict(run.data.params),
        "metrics": dict(run.data.metrics),
        "tags": dict(run.data.tags),
    }


def list_artifacts(
    run_id: str, path: str | None = None, tracking_uri: str | None = None
) -> list[str]:
    """Paths of every artifact file of a run under ``path`` (recursive)."""
    client = mlflow_client(tracking_uri)
    out: list[str] = []
    for entry in client.list_artifacts(run_id, path):
        if entry.is_dir:
            out.extend(list_artifacts(run_id, entry.path, tracking_uri))
        else:
            out.append(entry.path)
    return out


def read_artifact_text(run_id: str, path: str, tracking_uri: str | None = None) -> str:
    """The UTF-8 text of artifact ``path`` of a run (e.g. ``quarantine.json``)."""
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow_client(tracking_uri).download_artifacts(run_id, path, tmp)
        return Path(local).read_text(encoding="utf-8")


def metric_history(
    run_id: str, key: str, tracking_uri: str | None = None
) -> list[tuple[int, float]]:
    """(step, value) points of metric ``key`` of a run, ordered by step."""
    history = mlflow_client(tracking_uri).get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in history)


def runs_with_key(run_key: str, experiment: str, tracking_uri: str | None = None) -> list[str]:
    """Ids of every run of ``experiment`` tagged with ``run_key`` (tests: "no duplicate run")."""
    tracker = MlflowTracker(experiment, tracking_uri)
    if tracker.client.get_experiment_by_name(experiment) is None:
        return []
    return tracker.runs_with_key(run_key)
