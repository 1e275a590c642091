"""``jobs/dasnet_policy.py``: dasNet's stage 2 (SNES on the gain policy) through the pipeline.

Tiny generated data: 16 px scenes written as pyramids with a manifest. The label is in the red
channel (dark 0.2 / bright 0.8); the green channel is a per-scene random level that the
stage-1 model (hand-set weights: the backbone passes red and green through, the classifier adds
them) also adds, so it is right on about 80 % of the scenes. Silencing the green channel's gain
makes it right on all of them: a policy SNES can find, with a known answer.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from jobs import dasnet_policy
from models.registry import create_model
from pipeline.store.manifest import write_manifest
from pipeline.store.pyramid import open_pyramid, write_pyramid
from pipeline.track import tracking
from pipeline.track.packaging import Predictor
from pipeline.train.checkpoint import save_checkpoint
from tests.pipeline.tracking_fixtures import fresh_mlflow_uri

CLASSES = ["dark", "bright"]
SIDE = 16
KWARGS = {"num_classes": 2, "view_size": [8, 8], "passes": 2, "gate": "output", "policy": "bias",
          "backbone": "small_cnn", "backbone_kwargs": {"widths": [2], "norm": "none"}}


def _scenes(n: int, split: str, rng: np.random.Generator) -> list[tuple[str, str, int, np.ndarray]]:
    out = []
    for i in range(n):
        label = i % 2
        image = np.zeros((3, SIDE, SIDE), dtype=np.uint8)
        image[0] = 204 if label else 51  # red 0.8 / 0.2: the label
        image[1] = int(rng.integers(0, 256))  # green: a distracting level, 0..1
        out.append((f"{split}_{i:02d}", split, label, image))
    return out


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    """32 train + 40 val scenes as pyramids, and their manifest; returns the manifest path."""
    root = tmp_path_factory.mktemp("dasnet_data")
    rng = np.random.default_rng(0)
    rows = []
    for scene_id, split, label, image in [*_scenes(32, "train", rng), *_scenes(40, "val", rng)]:
        uri = write_pyramid(str(root / "pyramids"), scene_id, image, {"label": label}, coarsest=8)
        shapes = [list(s[1:]) for s in open_pyramid(uri).level_shapes]
        rows.append({
            "scene_id": scene_id, "split": split, "category": CLASSES[label], "label": label,
            "uri": uri, "height": SIDE, "width": SIDE, "channels": 3, "num_levels": len(shapes),
            "level_shapes": json.dumps(shapes),
            "box": None, "gsd": None, "timestamp": None, "source": f"generated:{scene_id}",
        })
    path = str(root / "manifest.parquet")
    write_manifest(path, rows, CLASSES)
    return path


def stage_one_model(sign: float = 1.0):
    """The 'trained' stage-1 dasNet: features (red, green) -> bright iff red + green > 1."""
    model = create_model("dasnet", **KWARGS)
    convs = [m for m in model.features.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        for i, conv in enumerate(convs):  # centre taps only: channel c passes through
            conv.weight.zero_()
            conv.bias.zero_()
            for c in range(2):
                conv.weight[c, c, 1, 1] = 1.0
            assert i > 0 or conv.in_channels == 3
        model.classifier.weight.copy_(sign * torch.tensor([[-2.0, -2.0], [2.0, 2.0]]))
        model.classifier.bias.copy_(sign * torch.tensor([2.0, -2.0]))
    return model.eval()


def write_stage_one(run_dir, model, name: str, epoch: int) -> None:
    """A checkpoint as the training job writes it (``pipeline.train.checkpoint``, Ray's dir names)."""
    save_checkpoint(run_dir / name, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                    scheduler=None, epoch=epoch, step=4 * epoch, rank_rng=[], config={}, metrics={})


def _sets(manifest, storage, *extra):
    sets = [f"data.manifest={manifest}", f"run.storage_path={storage}", "run.name=das",
            "run.mlflow_experiment=dasnet-policy", "snes.generations=25", "snes.batch_size=16",
            "snes.seed=0", *extra]
    return [x for s in sets for x in ("--set", s)]


def _non_policy(state):
    return {k: v for k, v in state.items() if not k.startswith("policy.")}


@pytest.fixture
def mlflow_uri(tmp_path_factory, monkeypatch):
    uri = fresh_mlflow_uri(tmp_path_factory)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def test_stage_two_starts_from_the_latest_stage_one_checkpoint_and_improves_the_reward(
    manifest, mlflow_uri, tmp_path, capsys
):
    storage = tmp_path / "runs"
    good = stage_one_model()
    # two checkpoints of the stage-1 run "das": the later epoch must win, whatever the names say
    write_stage_one(storage / "das", stage_one_model(sign=-1.0), "checkpoint_b_epoch1", epoch=1)
    write_stage_one(storage / "das", good, "checkpoint_a_epoch2", epoch=2)

    argv = _sets(manifest, storage) + ["--register", "das-policy", "--alias", "champion", "--json"]
    assert dasnet_policy.main(argv) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["stage1"] == str(storage / "das" / "checkpoint_a_epoch2")
    assert sum(line.startswith("[snes] generation ") for line in lines) == 25

    # the reward is reported per generation and rises; validation accuracy rises to 1
    history = summary["history"]
    assert len(history) == 25
    assert history[0]["centre_reward"] < 0.95 and history[-1]["centre_reward"] == 1.0
    m = summary["metrics"]
    assert 0.6 <= m["val/accuracy_stage1"] <= 0.9, m  # the stage-1 weights, not the flipped ones
    assert m["val/accuracy"] == 1.0

    # the result: stage-1 weights untouched, only the policy moved (green gain silenced)
    result = Predictor.from_dir(summary["model_dir"]).model
    stage1 = good.state_dict()
    assert _non_policy(result.state_dict()).keys() == _non_policy(stage1).keys()
    for key, value in _non_policy(result.state_dict()).items():
        assert torch.equal(value, stage1[key]), key
    gains = 2 * torch.sigmoid(result.policy.bias)
    assert gains[1] < 0.6 < 1.25 < gains[0], gains

    # MLflow: one run with the per-generation rewards, the accuracies, the model, registered
    run = tracking.run_info(summary["run_id"], mlflow_uri)
    assert run["status"] == "FINISHED"
    assert run["tags"]["pipeline.stage1"] == summary["stage1"]
    assert run["params"]["snes.generations"] == "25"
    steps = [s for s, _ in tracking.metric_history(summary["run_id"], "snes/centre_reward", mlflow_uri)]
    assert steps == list(range(25))
    assert tracking.metric_history(summary["run_id"], "val/accuracy", mlflow_uri)[-1][1] == 1.0
    assert "snes_history.json" in tracking.list_artifacts(summary["run_id"], None, mlflow_uri)
    assert tracking.alias_version(mlflow_uri, "das-policy", "champion") == summary["registered_version"]
    registered = tracking.load_pyfunc("models:/das-policy@champion", mlflow_uri)
    records = registered.predict({"uris": _val_uris(manifest)})
    assert [r["label"] for r in records] == _val_labels(manifest)


def _val_uris(manifest):
    from pipeline.store.manifest import read_manifest

    table = read_manifest(manifest).to_pandas()
    return list(table[table["split"] == "val"]["uri"])


def _val_labels(manifest):
    from pipeline.store.manifest import read_manifest

    table = read_manifest(manifest).to_pandas()
    return [int(v) for v in table[table["split"] == "val"]["label"]]


def test_stage_two_from_a_registered_stage_one_model(manifest, mlflow_uri, tmp_path, capsys):
    tracker = tracking.MlflowTracker("dasnet-stage1", mlflow_uri)
    tracker.start("stage1-key")
    tracker.register(tracker.log_model(stage_one_model(), classes=CLASSES), "das-stage1", alias="champion")
    tracker.end()
    argv = _sets(manifest, tmp_path / "runs", "snes.init=models:/das-stage1@champion",
                 "snes.generations=3") + ["--json"]
    assert dasnet_policy.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["stage1"] == "models:/das-stage1@champion" and len(summary["history"]) == 3
    result = Predictor.from_dir(summary["model_dir"]).model
    for key, value in _non_policy(stage_one_model().state_dict()).items():
        assert torch.equal(result.state_dict()[key], value), key


def test_refuses_a_stage_one_model_without_a_policy(manifest, tmp_path, capsys):
    storage = tmp_path / "runs"
    write_stage_one(storage / "das", create_model("lowres_cnn", num_classes=2), "checkpoint_0", epoch=1)
    assert dasnet_policy.main(_sets(manifest, storage)) == 2
    assert "dasNet" in capsys.readouterr().err
    one_pass = create_model("dasnet", **{**KWARGS, "passes": 1})
    write_stage_one(storage / "one", one_pass, "checkpoint_0", epoch=1)
    assert dasnet_policy.main(_sets(manifest, storage, "run.name=one")) == 2
    assert "passes=1" in capsys.readouterr().err
    assert dasnet_policy.main(_sets(manifest, storage, "run.name=none")) == 1  # no stage-1 run
    assert "does not exist" in capsys.readouterr().err
    (storage / "empty").mkdir()
    assert dasnet_policy.main(_sets(manifest, storage, "run.name=empty")) == 1
    assert "no checkpoint under" in capsys.readouterr().err


def test_bad_snes_config_exits_2_naming_the_key(capsys):
    assert dasnet_policy.main(["--set", "snes.generation=3"]) == 2
    assert "unknown config key 'snes.generation'" in capsys.readouterr().err
    assert dasnet_policy.main(["--set", "snes.generations=0"]) == 2
    assert "snes.generations" in capsys.readouterr().err


def test_view_batches_cover_the_split_every_pass_in_a_seeded_order():
    rows = {"key": np.array([f"k{i}" for i in range(5)]), "label": np.arange(5)}

    class Views:
        def view(self, keys, size):
            return torch.tensor([[int(k[1:])] for k in keys], dtype=torch.float32)

    def run(seed):
        return [b[1].tolist() for b in dasnet_policy.view_batches(rows, Views(), (4, 4), 2, 5, seed)]

    batches = run(0)
    assert batches == run(0) and batches != run(1)
    flat = [v for b in batches for v in b]
    assert sorted(flat[:5]) == list(range(5))  # the first pass sees every scene once
    assert all(len(b) == 2 for b in batches)
    big = list(dasnet_policy.view_batches(rows, Views(), (4, 4), 64, 2, 0))
    assert [len(labels) for _, labels in big] == [5, 5]  # a batch is at most the whole split
    assert torch.equal(big[0][0][:, 0], big[0][1].float())  # views and labels stay paired
