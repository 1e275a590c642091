"""``ray_output``: the one place that sets how much Ray says (no Ray is started here)."""

from __future__ import annotations

import logging
import os

import pytest

from pipeline.train.driver import RAY_NOTICES, _DropNotices, ray_output

KEYS = ("RAY_TRAIN_ENABLE_PRINT_PATCH", "RAY_COLOR_PREFIX", "RAY_DATA_LOG_LEVEL",
        "MLFLOW_LOGGING_LEVEL")


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    """No variable of ours set before; environment and logger levels restored after."""
    for key in KEYS:
        monkeypatch.setenv(key, "x")  # records the original value for the teardown
        monkeypatch.delenv(key)
    loggers = [logging.getLogger(), logging.getLogger("ray.data")]
    levels = [lg.level for lg in loggers]
    yield
    for lg, level in zip(loggers, levels, strict=True):
        lg.setLevel(level)
    for key in KEYS:  # ray_output sets os.environ itself
        os.environ.pop(key, None)


def test_quiet_by_default():
    import ray.data

    out = ray_output()
    assert (out.verbose, out.level) == (False, "WARNING")
    assert os.environ["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"
    assert os.environ["RAY_DATA_LOG_LEVEL"] == "WARNING"
    assert os.environ["MLFLOW_LOGGING_LEVEL"] == "WARNING"
    assert os.environ["RAY_COLOR_PREFIX"] == "0"  # pytest's stdout is not a terminal
    assert out.env == {k: os.environ[k] for k in KEYS}
    assert ray.data.DataContext.get_current().enable_progress_bars is False
    assert logging.getLogger("ray.data").level == logging.WARNING
    assert logging.getLogger().level == logging.WARNING
    from ray._private import ray_logging

    assert ray_logging._color("[repeated 2x across cluster]") == "[repeated 2x across cluster]"


def test_verbose_keeps_ray_info_lines():
    out = ray_output(verbose=True)
    assert (out.verbose, out.level) == (True, "INFO")
    assert "RAY_DATA_LOG_LEVEL" not in os.environ and "MLFLOW_LOGGING_LEVEL" not in os.environ
    assert os.environ["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"  # else every epoch line twice
    assert logging.getLogger("ray.data").level == logging.INFO


def test_a_variable_the_user_set_wins(monkeypatch):
    monkeypatch.setenv("RAY_DATA_LOG_LEVEL", "DEBUG")
    assert ray_output().env["RAY_DATA_LOG_LEVEL"] == "DEBUG"
    assert os.environ["RAY_DATA_LOG_LEVEL"] == "DEBUG"


def test_known_notices_are_dropped_and_nothing_else():
    def record(msg):
        return logging.LogRecord("ray.data.x", logging.WARNING, __file__, 1, msg, None, None)

    keep = _DropNotices()
    assert not keep.filter(record(RAY_NOTICES[0] + ". To enable, set ..."))
    assert keep.filter(record("Dataset execution failed"))


def test_without_state_api_drops_only_the_cleaners_state_api_warning(caplog):
    """The private instance's worker setup hook: Ray Train's placement-group cleaner's
    once-a-second "cannot query the State API" warning goes; its other warnings stay."""
    from ray.train.v2._internal.execution.controller import placement_group_cleaner

    from pipeline.train.driver import STATE_API_NOTICES, without_state_api

    logger = logging.getLogger(placement_group_cleaner.__name__)
    saved = list(logger.filters)
    try:
        without_state_api()
        without_state_api()  # a second call adds no second filter
        assert sum(isinstance(f, _DropNotices) for f in logger.filters) == 1
        with caplog.at_level(logging.WARNING, logger=logger.name):
            logger.warning(STATE_API_NOTICES[0] + ". State API may be temporarily unavailable.")
            logger.warning("Detected that the Ray Train controller actor (x) is dead.")
        assert [r.getMessage() for r in caplog.records] == [
            "Detected that the Ray Train controller actor (x) is dead."]
    finally:
        logger.filters[:] = saved
