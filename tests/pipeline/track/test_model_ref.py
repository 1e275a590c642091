"""``tracking.resolve_model`` pins a registry URI to one version; ``load_predictor`` loads it."""

import pytest

from pipeline.track import tracking
from tests.pipeline.infer_fixtures import register_brightness
from tests.pipeline.tracking_fixtures import fresh_mlflow_uri


def test_an_alias_is_pinned_to_the_version_it_named(tmp_path_factory):
    uri = fresh_mlflow_uri(tmp_path_factory)
    assert register_brightness(uri, "pinned", sign=1.0) == "1"
    ref = tracking.resolve_model("models:/pinned@champion", uri)
    assert ref == tracking.ModelRef("models:/pinned@champion", "models:/pinned/1", "pinned", "1")
    assert register_brightness(uri, "pinned", sign=-1.0) == "2"  # the alias moves on
    assert tracking.resolve_model("models:/pinned@champion", uri).version == "2"
    first = tracking.load_predictor(ref.uri, uri)  # still version 1: +10 on bright patches
    assert first.model.head.weight[1, 0].item() == 10.0
    assert tracking.resolve_model("models:/pinned/2", uri).uri == "models:/pinned/2"
    other = "models:/m-0123456789abcdef"  # a logged model by id: no version to pin
    assert tracking.resolve_model(other, uri) == tracking.ModelRef(other, other)
    with pytest.raises(LookupError, match="pinned@nope"):
        tracking.resolve_model("models:/pinned@nope", uri)
    with pytest.raises(LookupError, match="pinned version 7"):
        tracking.resolve_model("models:/pinned/7", uri)
