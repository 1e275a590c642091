"""A much shorter run of bench/learning.py: ATS and Zoom-In learn clearly better than chance.

A small, easy canvas: 300 px with 3 digits of the label and no
others (label = the digit shown), view 60 px (scale 0.2: a digit is about 5.6 px in the view),
patches read at level 1. Ten classes, so chance is 0.10; on 200 test canvases the standard
deviation of a chance-level accuracy is 0.02; the bar is 0.50 (measured here: ATS 0.825,
Zoom-In 0.82 in 36 s).
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "learning.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_learning", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_attention_models_learn_clearly_better_than_chance():
    bench = load_bench()
    setup = bench.Setup(
        canvas=300, view=60, others=0, n_train=600, n_test=200, epochs=3, budget_s=600,
        batch=8, lr=3e-3, models=("ats", "zoom_in"),
    )
    report = bench.run(setup, log=lambda msg: None)
    assert set(report["acc"]) == {"ats", "zoom_in"}
    for name, acc in report["acc"].items():
        assert acc >= 0.50, f"{name}: test accuracy {acc:.3f} after 3 epochs (chance 0.10)"
    json.dumps({k: v for k, v in report.items() if k != "rows"})  # the --json line serialises


def test_cli_prints_the_json_line_last(capsys):
    bench = load_bench()
    code = bench.main(
        ["--canvas", "300", "--view", "60", "--train", "16", "--test", "8", "--epochs", "2",
         "--batch", "8", "--models", "ats,lowres_cnn", "--track", "8", "--memory-at", "600",
         "--also-infer", "spread", "--json"]
    )
    assert code == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    report = json.loads(last)
    assert set(report["acc"]) == {"ats", "lowres_cnn"}
    assert report["canvas"] == 300 and report["seconds"] > 0
    assert set(report["peak_mem_mb"]) == {"ats", "lowres_cnn"}
    # the curve: (CPU s, wall s, test accuracy) at initialisation and after each epoch
    curve = report["curve"]["ats"]
    assert len(curve) == 3 and curve[0][:2] == [0.0, 0.0]
    assert all(0 < c[0] and 0 < c[1] and 0 <= c[2] <= 1 for c in curve[1:])
    assert curve[1][0] <= curve[2][0]
    peaks = report["peak_memory_bytes"]["ats"]
    assert set(peaks) == {"300", "600"} and min(peaks.values()) > 0
    assert report["bytes_per_sample"]["lowres_cnn"] == 0 < report["bytes_per_sample"]["ats"]
    assert 0.0 <= report["acc"]["ats"] <= 1.0
    # --also-infer: ATS's tracked rows carry the spread evaluation too; the CNN has no such mode
    tracked = report["tracked"]
    assert [h["test_acc"] for h in tracked["ats"]] == [c[2] for c in curve]
    for h in tracked["ats"]:
        assert 0 <= h["test_acc_spread"] <= 1 and 0 <= h["digits_seen_spread"] <= 5
        assert 0 <= h["digits_seen"] <= 5
    assert all("test_acc_spread" not in h for h in tracked["lowres_cnn"])


def test_a_model_of_its_own_budget_stops_on_it_and_the_others_keep_the_common_one():
    """``model_budget_s`` gives one model its own CPU seconds: a budget it spends in its first
    epoch stops it there, while the other model runs all its epochs on ``budget_s``."""
    bench = load_bench()
    setup = bench.Setup(canvas=300, view=60, others=0, n_train=16, n_test=8, epochs=3, batch=8,
                        budget_s=600.0, model_budget_s={"lowres_cnn": 1e-6},
                        models=("ats", "lowres_cnn"))
    report = bench.run(setup, log=lambda msg: None)
    assert report["budget_s"] == {"ats": 600.0, "lowres_cnn": 1e-6}  # what --json prints
    rows = {r["model"]: r for r in report["rows"]}
    assert (rows["lowres_cnn"]["budget_s"], rows["lowres_cnn"]["epochs"]) == (1e-6, 1)
    assert (rows["ats"]["budget_s"], rows["ats"]["epochs"]) == (600.0, 3)


def test_saved_model_loads_back_and_predicts_the_same(tmp_path):
    """--save-models writes each trained model; load_saved rebuilds it with its setup and
    it evaluates to the same accuracy and hit rate on the same canvases."""
    bench = load_bench()
    setup = bench.Setup(canvas=300, view=60, others=0, n_train=16, n_test=8, epochs=1, batch=8,
                        models=("zoom_in",), save_dir=str(tmp_path))
    report = bench.run(setup, log=lambda msg: None)
    model, saved_setup = bench.load_saved(tmp_path / "zoom_in-seed0.pt")
    assert saved_setup == setup and not model.training
    again = bench.evaluate(model, bench.build_split(bench.canvas_spec(setup), "test", 8, 60))
    assert again["acc"] == report["acc"]["zoom_in"]
    assert again["hit_rate"] == report["rows"][0]["hit_rate"]


def test_digits_seen_counts_each_covered_digit_once():
    import torch

    bench = load_bench()
    digits = torch.tensor([[[0, 0, 28, 28], [100, 100, 128, 128], [200, 0, 228, 28]]])
    boxes = torch.tensor([[[0, 0, 28, 28], [2, 2, 30, 30], [100, 100, 114, 114], [300, 300, 328, 328]]])
    # two boxes on digit 0 (counted once), a quarter of digit 1 (not half), none on digit 2
    assert bench.digits_seen(boxes, digits).tolist() == [1]
    assert bench.hits(boxes, digits).tolist() == [[True, True, False, False]]


def test_pixel_counter_counts_the_stored_bytes_under_each_box():
    """Boxes at level 1 (8 x 8) of a (1, 16, 16) image: a 4 x 4 level-1 region inside, one half outside
    (clipped to 2 x 4), one wholly outside (nothing)."""
    import torch

    from models.memory import TensorPyramidSource
    from models.protocol import ReadRequest

    bench = load_bench()
    source = TensorPyramidSource.from_images({"a": torch.zeros(1, 16, 16, dtype=torch.uint8)},
                                                coarsest=8)
    counter = bench.PixelCounter(source)
    boxes = torch.tensor([[[0, 0, 8, 8], [12, 0, 20, 8], [40, 40, 48, 48]]])
    out = counter.read(["a"], ReadRequest(boxes, 1, (4, 4)))
    assert out.shape == (1, 3, 1, 4, 4)
    assert counter.nbytes == 16 + 8 + 0
    assert counter.level0_sizes(["a"]).tolist() == [[16, 16]]  # everything else is passed on


def test_several_seeds_give_min_median_max_per_model(capsys):
    bench = load_bench()
    code = bench.main(
        ["--canvas", "300", "--view", "60", "--train", "16", "--test", "8", "--epochs", "1",
         "--batch", "8", "--models", "lowres_cnn,stn", "--seeds", "0,1,2", "--json"]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["seeds"] == [0, 1, 2]
    for m in ("lowres_cnn", "stn"):
        accs = report["acc_seeds"][m]
        assert len(accs) == 3 and report["acc_min"][m] == min(accs) == sorted(accs)[0]
        assert report["acc"][m] == report["acc_median"][m] == sorted(accs)[1]
        assert report["acc_max"][m] == max(accs)
        assert len(report["bytes_per_sample_seeds"][m]) == 3
    assert report["bytes_per_sample"]["lowres_cnn"] == 0 < report["bytes_per_sample"]["stn"]


def test_parallel_processes_give_the_same_report_as_one(tmp_path):
    """--jobs 2 runs each (seed, model) pair in its own process: same accuracies and bytes as
    in one process (every run is seeded and single-threaded)."""
    import subprocess

    args = [sys.executable, str(BENCH), "--canvas", "300", "--view", "60", "--train", "16",
            "--test", "8", "--epochs", "1", "--batch", "8", "--models", "lowres_cnn,tnet",
            "--seeds", "0,1", "--json"]
    one, two = (json.loads(subprocess.run(args + extra, capture_output=True, text=True, check=True,
                                           timeout=300).stdout.strip().splitlines()[-1])
                for extra in ([], ["--jobs", "2"]))
    assert one["acc_seeds"] == two["acc_seeds"]
    assert one["bytes_per_sample_seeds"] == two["bytes_per_sample_seeds"]
    assert one["budget_s"] == two["budget_s"] == {"lowres_cnn": 420.0, "tnet": 420.0}


def test_reference_protocol_sets_issue_16s_canvases_and_flags_override_it():
    bench = load_bench()
    setup, *_ = bench.parse(["--protocol", "reference"])
    assert (setup.canvas, setup.noise, setup.others, setup.margin) == (1500, 50, 2, 28)
    assert (setup.view, setup.n_train, setup.n_test) == (180, 5000, 1000)
    assert setup.view / setup.canvas == 0.12
    # the goal's run: both models, Zoom-In 2 CPU hours, ATS 1, curve and memory at 3000 / 6000 px
    assert (setup.models, setup.budget_s, setup.track) == (("ats", "zoom_in"), 7200.0, 300)
    assert setup.model_budget_s == {"ats": 3600.0}
    assert setup.memory_at == (3000, 6000)
    assert setup.model_kwargs == bench.REFERENCE_MODEL_KWARGS
    for name in setup.models:  # the settings are the models' own keyword arguments
        registered, kwargs = bench.model_kwargs(name, setup)
        assert bench.create_model(registered, **kwargs).n_patches == 20
    setup, *_ = bench.parse(["--protocol", "reference", "--train", "50", "--view", "150",
                             "--memory-at", "", "--model-kwargs", '{"ats": {"n_patches": 40}}',
                             "--budget-s", "60"])
    assert (setup.canvas, setup.n_train, setup.view, setup.noise) == (1500, 50, 150, 50)
    assert (setup.budget_s, setup.model_budget_s) == (60.0, {})  # every model's budget
    assert setup.memory_at == ()
    assert setup.model_kwargs["ats"] == {"n_patches": 40}  # as given: older commands still reproduce
    assert setup.model_kwargs["zoom_in"] == bench.REFERENCE_MODEL_KWARGS["zoom_in"]
    setup, *_ = bench.parse([])
    assert (setup.canvas, setup.noise, setup.margin, setup.view) == (500, 0, 0, 50)
    assert setup.model_kwargs == {} and setup.memory_at == ()


def test_the_budget_counts_cpu_seconds_and_an_optional_wall_deadline():
    """A clock that slept 0.3 s wall has used almost no CPU: the CPU budget is barely
    touched, a wall budget of 0.3 s is used up."""
    import time

    bench = load_bench()
    clock = bench.Clock()
    time.sleep(0.3)
    assert clock.elapsed() < 0.1 and clock.wall() >= 0.3
    assert bench.budget_used(clock, bench.Setup(budget_s=10.0)) < 0.01
    assert bench.budget_used(clock, bench.Setup(budget_s=10.0, wall_budget_s=0.3)) >= 1.0
    since = clock.now()
    time.sleep(0.2)
    clock.pause(since)  # an evaluation: off both clocks
    assert clock.wall() < 0.45


def test_every_soft_attention_feature_net_builds_and_reads_patches():
    """Each report name of the soft-attention families is ATS with that feature net, and one
    forward pass reads patches; ``ats_residual_attention`` carries a soft mask per stage."""
    import torch

    from models.layers import SoftMask
    from models.registry import create_model
    from pipeline.synth.megapixel_mnist import MegapixelMNISTSpec

    bench = load_bench()
    setup = bench.Setup(canvas=300, view=60, others=0, n_train=4, n_test=4)
    spec = MegapixelMNISTSpec(canvas=(300, 300), n_other=0, seed=0)
    data = bench.build_split(spec, "test", 4, 60)
    for name in bench.SOFT_FEATURE_NETS:
        reg, kwargs = bench.model_kwargs(name, setup)
        model = create_model(reg, **kwargs)
        out = bench.run_batch(model, data, torch.arange(4), torch.Generator().manual_seed(0))
        assert reg == "ats_mnist" and out.logits.shape == (4, 10), name
        assert out.boxes.shape[:2] == (4, model.n_patches), name
    _, kwargs = bench.model_kwargs("ats_residual_attention", setup)
    masks = [m for m in create_model("ats_mnist", **kwargs).modules() if isinstance(m, SoftMask)]
    assert len(masks) == 3  # after each of the (16, 32, 64) stages


def test_racnn_setting_reads_at_most_a_quarter_of_each_canvas():
    """Issue 12's cap for the hard-attention families: ``racnn`` (its square on the whole
    canvas, read at level 1) reads exactly level 1 of each 500 px canvas, 250 x 250 = 62,500
    stored bytes, a quarter of the canvas's 250,000, and no more."""
    from models.registry import create_model

    bench = load_bench()
    setup = bench.Setup(canvas=500, view=50, n_train=4, n_test=4)
    data = bench.build_split(bench.canvas_spec(setup), "test", 4, setup.view)
    reg, kwargs = bench.model_kwargs("racnn", setup)
    report = bench.evaluate(create_model(reg, **kwargs), data)
    assert report["bytes_per_sample"] == 500 * 500 / 4


def test_scribble_gap_repaints_only_the_scribbles_and_reports_every_kind(tmp_path, capsys):
    """bench/scribble_gap.py: the swapped-bank canvases keep their digits and layouts but not
    their pixels; the JSON has an accuracy in [0, 1] for each of the four kinds."""
    import torch

    from bench import learning as bench
    from bench import scribble_gap

    setup = bench.Setup(canvas=300, view=60, noise=20, others=0, n_train=8, n_test=8, epochs=1,
                        batch=8, models=("ats",), save_dir=str(tmp_path))
    bench.run(setup, log=lambda msg: None)
    same = scribble_gap.canvases(setup, "test", "test", 4)
    swapped = scribble_gap.canvases(setup, "test", "train", 4)
    assert torch.equal(same.labels, swapped.labels) and torch.equal(same.digits, swapped.digits)
    assert not torch.equal(same.views, swapped.views)
    assert scribble_gap.main([str(tmp_path / "ats-seed0.pt"), "--n", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(report["acc"]) == set(scribble_gap.KINDS) and report["n"] == 4
    assert all(0.0 <= a <= 1.0 for a in report["acc"].values())
    for kind, acc in report["acc"].items():  # every wrong answer counted under one class
        assert len(report["wrong_as"][kind]) == 10
        assert sum(report["wrong_as"][kind]) == round((1 - acc) * 4)


def test_weight_decay_is_adamw_on_conv_and_linear_weights_only():
    """``--weight-decay`` gives AdamW whose decayed group holds exactly the >= 2-d weights;
    biases and BatchNorm's scales are in the undecayed group; without it, plain Adam."""
    import torch

    bench = load_bench()
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4),
                                torch.nn.Flatten(), torch.nn.Linear(4, 2))
    opt = bench.optimizer(model, bench.Setup(weight_decay=0.05))
    assert isinstance(opt, torch.optim.AdamW)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    assert [p.shape for p in decayed["params"]] == [(4, 1, 3, 3), (2, 4)]
    assert len(plain["params"]) == 4  # conv bias, BatchNorm weight and bias, linear bias
    assert type(bench.optimizer(model, bench.Setup())) is torch.optim.Adam
    setup, *_ = bench.parse(["--weight-decay", "0.05"])
    assert setup.weight_decay == 0.05
