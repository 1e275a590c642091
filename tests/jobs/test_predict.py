"""``jobs/predict.py``: predictions from the registry for pyramid URIs and image files."""

import json

import numpy as np
import pytest
from PIL import Image

from jobs import predict
from pipeline.track import tracking
from pipeline.track.packaging import Predictor
from tests.pipeline.tracking_fixtures import brightness_model, brightness_scenes, fresh_mlflow_uri

CLASSES = ["dark", "bright"]


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """``models:/tiny-predict@champion`` in a fresh SQLite MLflow; returns the tracking URI."""
    uri = fresh_mlflow_uri(tmp_path_factory)
    tracker = tracking.MlflowTracker("predict", uri)
    tracker.start("k-predict")
    model_uri = tracker.log_model(brightness_model(), classes=CLASSES)
    tracker.register(model_uri, "tiny-predict", alias="champion")
    tracker.end()
    return uri


def _lines(capsys):
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_predict_image_files(registered, tmp_path, capsys):
    source, keys, labels = brightness_scenes()
    paths = []
    for key in keys[:4]:
        path = tmp_path / f"{key}.png"
        Image.fromarray(np.moveaxis(source.pyramids[key][0].numpy(), 0, -1)).save(path)
        paths.append(path)
    np.save(tmp_path / "raw.npy", source.pyramids[keys[5]][0].numpy())
    argv = ["--model", "models:/tiny-predict@champion", "--tracking-uri", registered]
    for path in [*paths, tmp_path / "raw.npy"]:
        argv += ["--image", str(path)]
    assert predict.main(argv) == 0
    records = _lines(capsys)
    assert [r["key"] for r in records] == [str(p) for p in [*paths, tmp_path / "raw.npy"]]
    assert [r["label"] for r in records] == [*labels[:4], labels[5]]
    assert [r["class"] for r in records] == [CLASSES[v] for v in [*labels[:4], labels[5]]]
    assert len(records[0]["attention"]) == 16 and len(records[0]["boxes"]) == 2
    # the same image in memory gives the same numbers as through the registry and a PNG file
    reference = Predictor(model=brightness_model(), spec={"classes": CLASSES})
    expected = reference.predict_image(source.pyramids[keys[0]][0].numpy())
    # (batched vs single forward: equal up to float rounding)
    assert records[0]["probabilities"] == pytest.approx(
        expected["probabilities"], rel=1e-5, abs=1e-12
    )


def test_predict_pyramid_uris_through_the_zarr_reader(registered, tmp_path, capsys):
    from pipeline.store.pyramid import write_pyramid

    source, keys, labels = brightness_scenes()
    # both pyramids stop at 16 px (brightness_scenes too), so the views match level for level
    uris = [
        write_pyramid(
            str(tmp_path / "pyramids"),
            key,
            source.pyramids[key][0].numpy(),
            {"label": lab},
            coarsest=16,
        )
        for key, lab in zip(keys, labels, strict=True)
    ]
    argv = ["--model", "models:/tiny-predict@champion", "--tracking-uri", registered, "--compact"]
    for uri in uris:
        argv += ["--uri", uri]
    assert predict.main(argv + ["--batch-size", "3"]) == 0
    records = _lines(capsys)
    assert [r["key"] for r in records] == uris
    assert [r["label"] for r in records] == labels
    assert "attention" not in records[0]
    # pyramid and in-memory paths read the same pixels: identical probabilities
    in_memory = Predictor(model=brightness_model(), spec={"classes": CLASSES}).predict_source(
        source, keys
    )
    for got, want in zip(records, in_memory, strict=True):
        assert got["probabilities"] == pytest.approx(want["probabilities"], rel=1e-5, abs=1e-12)


def test_predict_reports_a_missing_model(registered, tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(image)
    argv = [
        "--model",
        "models:/no-such-model@champion",
        "--tracking-uri",
        registered,
        "--image",
        str(image),
    ]
    assert predict.main(argv) == 1
    assert "no-such-model" in capsys.readouterr().err


def test_read_image_modes(tmp_path):
    grey = tmp_path / "g.png"
    Image.fromarray(np.full((4, 5), 7, dtype=np.uint8)).save(grey)
    assert predict.read_image(grey).shape == (4, 5)
    rgba = tmp_path / "c.png"
    Image.fromarray(np.full((4, 5, 4), 9, dtype=np.uint8), mode="RGBA").save(rgba)
    assert predict.read_image(rgba).shape == (4, 5, 3)
    wide = tmp_path / "w.png"
    Image.fromarray(np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)).save(wide)
    assert predict.read_image(wide).tolist() == [[0, 64], [128, 255]]


def test_predict_fails_on_a_scene_whose_shards_are_missing(registered, tmp_path, capsys):
    """Deleted shards must not become zero pixels and a confident "dark" answer."""
    from pipeline.store import storage
    from pipeline.store.pyramid import write_pyramid

    source, keys, labels = brightness_scenes()
    assert labels[1] == 1  # a bright scene: every shard of every level holds pixels
    uri = write_pyramid(str(tmp_path / "pyramids"), keys[1],
                        source.pyramids[keys[1]][0].numpy(), {"label": 1}, coarsest=16)
    shards = [u for u in storage.list_prefix(uri) if "/c/" in u]
    assert len(shards) == 3  # levels 48, 24 and 12 px: one shard each
    for shard in shards:
        (tmp_path / "pyramids" / shard[len(str(tmp_path / "pyramids")) + 1 :]).unlink()
    argv = ["--model", "models:/tiny-predict@champion", "--tracking-uri", registered,
            "--compact", "--uri", uri]
    assert predict.main(argv) == 1  # no input could be predicted
    captured = capsys.readouterr()
    (line,) = [json.loads(x) for x in captured.out.splitlines()]
    assert line["key"] == uri and line["error"].startswith("MissingShardError: ")
    assert uri in captured.err and "is missing" in captured.err and "shard (0, 0)" in captured.err


class _Payload:
    """Unpickling this runs ``code`` (what a planted pickle does)."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


def test_predict_runs_no_code_from_the_artifact_store(tmp_path_factory, tmp_path, capsys):
    """Someone who can write to the artifact store edits the stored ``pyfunc_entry.py`` and
    plants pickles beside the weights: predict's output is unchanged and none of it runs
    (stock ``mlflow.pyfunc.load_model`` does run the edited entry file)."""
    import pickle

    uri = fresh_mlflow_uri(tmp_path_factory, "mlflow-edit")
    tracker = tracking.MlflowTracker("predict", uri)
    tracker.start("k-edit")
    tracker.register(tracker.log_model(brightness_model(), classes=CLASSES), "edited",
                     alias="champion")
    tracker.end()
    source, keys, _ = brightness_scenes()
    image = tmp_path / "x.npy"
    np.save(image, source.pyramids[keys[1]][0].numpy())
    argv = ["--model", "models:/edited@champion", "--tracking-uri", uri, "--image", str(image)]
    assert predict.main(argv) == 0
    before = capsys.readouterr().out

    store = tmp_path_factory.getbasetemp()
    (entry,) = [p for p in store.rglob("pyfunc_entry.py") if "mlflow-edit" in str(p)]
    code_marker, pickle_marker = tmp_path / "entry-ran", tmp_path / "pickle-ran"
    entry.write_text(f"open({str(code_marker)!r}, 'w').write('ran')\n" + entry.read_text())
    payload = pickle.dumps(_Payload(f"open({str(pickle_marker)!r}, 'w').write('ran')"))
    for where in (entry.parent, entry.parent / "artifacts"):
        for name in ("python_model.pkl", "model.pkl", "model.pt"):
            (where / name).write_bytes(payload)

    assert predict.main(argv) == 0
    assert capsys.readouterr().out == before
    assert not code_marker.exists() and not pickle_marker.exists()
    tracking.load_pyfunc("models:/edited@champion", uri)  # what predict did before
    assert code_marker.exists()  # the edit is live: the test above could have caught it


def test_predict_over_several_uris_prints_the_good_ones_and_reports_the_bad_one(
        registered, tmp_path, capsys):
    from pipeline.store import storage
    from pipeline.store.pyramid import write_pyramid

    source, keys, _ = brightness_scenes()
    uris = [write_pyramid(str(tmp_path / "p"), key, source.pyramids[key][0].numpy(), {},
                          coarsest=16) for key in keys[:3]]
    bad = uris[1]
    for shard in [u for u in storage.list_prefix(bad) if "/c/" in u]:
        storage.delete_object(shard)
    argv = ["--model", "models:/tiny-predict@champion", "--tracking-uri", registered,
            "--compact", *[x for u in uris for x in ("--uri", u)]]
    assert predict.main(argv) == 3
    captured = capsys.readouterr()
    lines = [json.loads(x) for x in captured.out.splitlines()]
    assert [line["key"] for line in lines] == uris
    assert [("error" in line) for line in lines] == [False, True, False]
    assert all("probabilities" in line for line in (lines[0], lines[2]))
    assert lines[1]["error"].startswith("MissingShardError: ") and bad in lines[1]["error"]
    assert f"error: {bad}: MissingShardError" in captured.err
