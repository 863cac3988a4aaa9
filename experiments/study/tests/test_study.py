"""Smoke tests of the study harness (experiments/study): data, models, init, runs, protocol, tables."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import random
from collections import Counter

import numpy as np
import pytest
import torch

from experiments.study import experiments as ex
from experiments.study.data import StudyData, digits_splits, mnist1d_splits
from experiments.study.harness import RunConfig, initial_model, kw, run_one
from experiments.study.methods import gsgd_callback
from experiments.study.models import MODELS, build_model
from experiments.study.protocol import RunStore, evaluate_seeds, lr_grid, mean_std, summarize, tune, write_tables
from lightning_gsgd import detect_topology

MNIST = ("mlp", "width", "cnn", "invariance")


def test_mnist1d_is_generated_locally_with_fixed_splits_and_leaves_global_rngs_alone():
    np_before, py_before = np.random.get_state()[1].copy(), random.getstate()
    s = mnist1d_splits(num_samples=200, n_val=20)
    assert np.array_equal(np.random.get_state()[1], np_before) and random.getstate() == py_before
    assert s.sizes() == (140, 20, 40) and s.n_features == 40 and s.n_classes == 10
    again = mnist1d_splits.__wrapped__(num_samples=200, n_val=20)  # regenerated, not the cached object
    assert torch.equal(again.x_val, s.x_val) and torch.equal(again.y_test, s.y_test)


def test_digits_splits_partition_the_dataset():
    from sklearn.datasets import load_digits

    s = digits_splits()
    assert s.sizes() == (1079, 359, 359) and s.n_features == 64 and s.n_classes == 10
    d = load_digits()
    ours = Counter(
        (tuple((16 * r).round().int().tolist()), int(t))
        for x, y in ((s.x_train, s.y_train), (s.x_val, s.y_val), (s.x_test, s.y_test))
        for r, t in zip(x, y)
    )
    assert ours == Counter((tuple(int(v) for v in r), int(t)) for r, t in zip(d.data, d.target))


def _batches(data: StudyData, epochs: int) -> list[torch.Tensor]:
    loader = data.train_dataloader()
    return [y for _ in range(epochs) for _, y in loader]


def test_training_order_depends_only_on_the_seed():
    s = digits_splits()
    a, b = _batches(StudyData(s, 100, seed=3), 2), _batches(StudyData(s, 100, seed=3), 2)
    c = _batches(StudyData(s, 100, seed=4), 2)
    assert len(a) == 2 * 11 and all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert not torch.equal(a[0], a[11])  # a new permutation every epoch
    assert sorted(torch.cat(a[:11]).tolist()) == sorted(s.y_train.tolist())


@pytest.mark.parametrize("name", ["mlp2", "plain_mlp", "plain_cnn"])
def test_plain_models_are_one_chain_covering_everything(name):
    model = build_model(name, 40, 10)
    x = torch.randn(3, 40)
    assert model(x).shape == (3, 10)
    topo = detect_topology(model, x)
    assert len(topo.chains) == 1 and topo.coverage == 1.0


def test_plain_mlp_depth_and_cnn_layers():
    depth = build_model("plain_mlp", 40, 10, depth=12)
    assert sum(isinstance(m, torch.nn.Linear) for m in depth) == 12
    cnn = build_model("plain_cnn", 40, 10, channels=8, blocks=(2, 2, 2))
    assert sum(isinstance(m, torch.nn.Conv1d) for m in cnn) == 7
    assert set(MODELS) == {"mlp2", "plain_mlp", "plain_cnn", "plain_cnn2d", "bn_resnet", "resnet18"}
    resnet = build_model("bn_resnet", 40, 10)
    assert resnet(torch.randn(3, 40)).shape == (3, 10)
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in resnet.modules())


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_initial_weights_are_identical_across_methods_per_seed():
    s = digits_splits()
    base = RunConfig(method="sgd", lr=0.1, dataset="digits", model_kwargs=kw(width=16), seed=7)
    w = {m: _params(initial_model(dataclasses.replace(base, method=m), s)[0]) for m in ex.ALL_METHODS}
    pairs = [("sgd", "path-sgd"), ("gsgd", "sgd+skeleton")]
    assert all(all(torch.equal(a, b) for a, b in zip(w[m1], w[m2])) for m1, m2 in pairs)
    assert not all(torch.equal(a, b) for a, b in zip(w["sgd"], w["gsgd"]))  # the skeleton init acted
    other_seed = _params(initial_model(dataclasses.replace(base, seed=8), s)[0])
    assert not torch.equal(w["sgd"][0], other_seed[0])
    before = torch.random.get_rng_state()
    initial_model(base, s)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's generator is untouched


def test_rescaled_start_is_the_same_function_with_the_same_factors_for_every_method():
    s = digits_splits()
    base = RunConfig(method="sgd+skeleton", lr=0.1, dataset="digits", model_kwargs=kw(width=16), seed=1)
    plain, _ = initial_model(base, s)
    scaled, _ = initial_model(dataclasses.replace(base, rescale_spread=2.0), s)
    scaled_gsgd, _ = initial_model(dataclasses.replace(base, method="gsgd", rescale_spread=2.0), s)
    x = s.x_val[:16]
    assert not torch.equal(plain[0].weight, scaled[0].weight)
    torch.testing.assert_close(scaled(x), plain(x), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(scaled.parameters(), scaled_gsgd.parameters()))


@pytest.mark.parametrize(
    "method,model,expected",
    [("sgd", "mlp2", "SGD"), ("sgd+skeleton", "mlp2", "SGD"), ("path-sgd", "plain_cnn", "PathSGD")],
)
def test_run_one_trains_through_lightning(method, model, expected):
    small = kw(channels=4) if model == "plain_cnn" else kw(width=16)
    cfg = RunConfig(
        method=method,
        lr=1e-3,
        dataset="digits",
        model=model,
        model_kwargs=small,
        epochs=2,
        limit_train_batches=3,
        schedule="cosine",
    )
    r = run_one(cfg, accelerator="cpu")
    assert r["optimizer"] == expected and r["steps"] == 6 and not r["diverged"]
    assert [h["epoch"] for h in r["history"]] == [0, 1]
    assert r["history"][1]["lr"] < cfg.lr  # the cosine schedule is attached
    assert 0.0 <= r["test_acc"] <= 1.0 and math.isfinite(r["test_loss"])
    assert r["id"] == cfg.run_id() and json.dumps(r)


def test_run_one_marks_a_diverging_run_and_stops_it():
    cfg = RunConfig(method="sgd", lr=1e6, dataset="digits", model="plain_mlp", epochs=3, momentum=0.9)
    r = run_one(cfg, accelerator="cpu")
    assert r["diverged"] and r["steps"] < 3 * 9


def test_gsgd_method_trains_through_the_callback_from_the_harness_init():
    cfg = RunConfig(method="gsgd", lr=1e-3, dataset="digits", epochs=1, limit_train_batches=2)
    r = run_one(cfg, accelerator="cpu")
    assert r["optimizer"] == "GSGD" and r["steps"] == 2 and not r["diverged"]
    assert r["skipped_steps"] == 0
    cb = gsgd_callback()
    assert cb.skeleton_init is False  # the harness did it (before any rescaling)


def test_gsgd_method_follows_the_cosine_schedule_with_the_sgd_hyper_parameters():
    # the callback converts the module's SGD (lr, momentum, weight decay) and the scheduler drives GSGD
    cfg = RunConfig(
        method="gsgd", lr=0.05, dataset="digits", epochs=2, limit_train_batches=3, momentum=0.9, schedule="cosine"
    )
    r = run_one(cfg, accelerator="cpu")
    assert r["optimizer"] == "GSGD" and r["steps"] == 6 and not r["diverged"]
    lrs = [h["lr"] for h in r["history"]]
    assert lrs[0] == pytest.approx(0.05 * (1 + math.cos(math.pi * 3 / 6)) / 2)  # after epoch 1 (3 of 6 steps)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_bn_resnet_gsgd_uses_the_authors_bn_mode():
    cfg = RunConfig(
        method="gsgd",
        lr=0.05,
        dataset="digits",
        model="bn_resnet",
        model_kwargs=kw(channels=4),
        epochs=1,
        limit_train_batches=2,
        gsgd_kwargs=kw(**ex.experiments()["bn-resnet"].gsgd_kwargs),
    )
    assert dict(cfg.gsgd_kwargs) == {"bn_mode": "authors_heuristic"}
    _, topo = initial_model(cfg, digits_splits())
    assert topo is not None and len(topo.bn_layers) == 9 and not topo.chains
    r = run_one(cfg, accelerator="cpu")
    assert r["optimizer"] == "GSGD" and r["steps"] == 2 and not r["diverged"]


def test_bn_resnet_trains_with_sgd():
    cfg = RunConfig(
        method="sgd",
        lr=0.05,
        dataset="digits",
        model="bn_resnet",
        model_kwargs=kw(channels=4),
        epochs=1,
        limit_train_batches=2,
    )
    r = run_one(cfg, accelerator="cpu")
    assert r["optimizer"] == "SGD" and r["steps"] == 2


class FakeRunner:
    """Validation accuracy peaks at lr = peak (in log space); counts calls."""

    def __init__(self, peak: float) -> None:
        self.peak = peak
        self.calls: list[RunConfig] = []

    def __call__(self, cfg: RunConfig) -> dict:
        self.calls.append(cfg)
        acc = 0.9 - 0.1 * abs(math.log10(cfg.lr / self.peak)) + 0.001 * cfg.seed
        return {
            "id": cfg.run_id(),
            "config": cfg.to_dict(),
            "history": [{"epoch": 0, "val_acc": acc}],
            "val_acc": acc,
            "val_loss": 1 - acc,
            "test_acc": acc - 0.05,
            "test_loss": 1.1 - acc,
            "diverged": cfg.lr > 10,
            "optimizer": "SGD",
            "steps": 1,
            "fit_s": 0.1,
            "loadavg": 0.0,
        }


def test_tune_picks_the_best_interior_lr_and_extends_an_edge(tmp_path):
    base = RunConfig(method="sgd", lr=0.0, dataset="digits")
    grid = lr_grid(0.01, 5)
    assert grid == [0.001, 0.00316, 0.01, 0.0316, 0.1]
    runner = FakeRunner(peak=0.0316)
    c = tune(base, "sgd", grid, ["constant"], [0], RunStore(None), runner)
    assert (c.lr, c.grid_runs, c.at_edge) == (0.0316, 5, False)
    runner = FakeRunner(peak=1.0)  # best beyond the upper edge: extended until interior
    c = tune(base, "sgd", grid, ["constant"], [0], RunStore(None), runner)
    assert (c.lr, c.grid_runs, c.at_edge) == (1.0, 8, False)
    assert [cfg.lr for cfg in runner.calls][-3:] == [0.316, 1.0, 3.16]
    runner = FakeRunner(peak=1e-6)  # far below: three extensions, still at the edge, and it says so
    c = tune(base, "sgd", grid, ["constant"], [0], RunStore(None), runner)
    assert (c.lr, c.grid_runs, c.at_edge) == (0.0000316, 8, True)


def test_final_seeds_summary_tables_and_resume(tmp_path):
    base = RunConfig(method="sgd", lr=0.0, dataset="digits")
    store = RunStore(tmp_path / "runs.jsonl")
    runner = FakeRunner(peak=0.01)
    c = tune(base, "sgd", [0.001, 0.01, 0.1], ["constant", "cosine"], [0], store, runner)
    runs = evaluate_seeds(base, c, [1, 2], store, runner, rescale_spread=0.5)
    row = summarize(c, runs, {"width": 8})
    accs = [0.9 + 0.001 * s - 0.05 for s in (1, 2)]
    assert row["test_acc_mean"] == pytest.approx(sum(accs) / 2)
    assert row["test_acc_std"] == pytest.approx(abs(accs[0] - accs[1]) / math.sqrt(2))
    assert row["seeds"] == 2 and row["width"] == 8 and row["grid_runs"] == 6
    assert all(r["config"]["rescale_spread"] == 0.5 for r in runs)
    write_tables(tmp_path, store, [row])
    with (tmp_path / "runs.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 8
    assert json.loads((tmp_path / "summary.json").read_text())[0]["lr"] == 0.01
    assert (tmp_path / "curves.csv").read_text().count("\n") == 9
    n = len(runner.calls)
    again = RunStore(tmp_path / "runs.jsonl")  # a restarted experiment reruns nothing
    tune(base, "sgd", [0.001, 0.01, 0.1], ["constant", "cosine"], [0], again, runner)
    evaluate_seeds(base, c, [1, 2], again, runner, rescale_spread=0.5)
    assert len(runner.calls) == n


def test_experiment_definitions_and_a_whole_experiment_with_a_fake_runner(tmp_path):
    exps = ex.experiments()
    bn = {"bn-exact", "bn-invariance", "mnist-resnet18"}
    assert set(exps) == {"width", "depth", "invariance", "bn-resnet"} | {f"mnist-{n}" for n in MNIST} | bn
    assert exps["width"].schedules == ("constant", "cosine")
    assert exps["width"].runs_planned() == 6 * 4 * (7 * 2 + 5)
    assert [s.label["width"] for s in exps["width"].settings] == [32, 64, 128, 256, 512, 1024]
    assert exps["invariance"].spreads == (0.0, 0.5, 1.0, 2.0, 3.0)
    small = ex.Experiment(
        "t",
        "tiny",
        (ex.Setting({"width": 8}, RunConfig(method="sgd", lr=0.0, dataset="digits", model_kwargs=kw(width=8))),),
        methods=("sgd", "path-sgd"),
        spreads=(0.0, 1.0),
        final_seeds=(1, 2),
    )
    runner = FakeRunner(peak=1e-3)
    summary = ex.run_experiment(small, tmp_path, runner=runner)
    assert [(r["method"], r["rescale_spread"]) for r in summary] == [
        ("sgd", 0.0),
        ("sgd", 1.0),
        ("path-sgd", 0.0),
        ("path-sgd", 1.0),
    ]
    path_grid = ex.grid_for("path-sgd", small.settings[0].base)
    assert len(path_grid) == ex.GRID_POINTS and path_grid != ex.grid_for("sgd", small.settings[0].base)
    assert (tmp_path / "summary.csv").exists()


def test_reduce_keeps_the_protocol_and_refuses_what_does_not_fit():
    exps = ex.experiments(epoch_scale=0.5)
    assert exps["width"].settings[0].base.epochs == 30 and exps["depth"].settings[-1].base.epochs == 20
    w = ex.reduce(exps["width"], only={"width": ["32", "512"]}, grid_points=5)
    assert [s.label["width"] for s in w.settings] == [32, 512] and w.methods == ex.ALL_METHODS
    assert w.runs_planned() == 2 * 4 * (5 * 2 + 5) and w.final_seeds == ex.FINAL_SEEDS
    assert ex.reduce(exps["width"], schedules=["constant"]).schedules == ("constant",)
    with pytest.raises(ValueError, match="schedules"):
        ex.reduce(exps["width"], schedules=["step"])
    assert len(ex.grid_for("sgd", w.settings[0].base, w.grid_points)) == 5
    d = ex.reduce(exps["depth"], only={"depth": ["4", "8"]})
    assert [(s.label["model"], s.label["depth"]) for s in d.settings] == [
        ("plain_mlp", 4),
        ("plain_mlp", 8),
        ("plain_cnn", 8),
    ]
    inv = ex.reduce(exps["invariance"], methods=["path-sgd", "sgd", "gsgd"], spreads=[0, 3])
    assert inv.methods == ("sgd", "gsgd", "path-sgd") and inv.spreads == (0.0, 3.0)
    assert all(type(s) is float for s in inv.spreads)  # an int 0 would give other run ids than 0.0
    with pytest.raises(ValueError, match="no method"):
        ex.reduce(exps["bn-resnet"], methods=["path-sgd"])
    with pytest.raises(ValueError, match="no label 'depth'"):
        ex.reduce(exps["width"], only={"depth": ["4"]})
    with pytest.raises(ValueError, match="no setting left"):
        ex.reduce(exps["width"], only={"width": ["7"]})
    with pytest.raises(ValueError, match="at least 3"):
        ex.reduce(exps["width"], grid_points=2)


def test_mean_std_is_nan_when_a_value_is_not_finite():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert all(math.isnan(v) for v in mean_std([1.0, math.nan, 3.0]))
    assert all(math.isnan(v) for v in mean_std([1.0, math.inf]))
    m, s = mean_std([4.0])
    assert m == 4.0 and math.isnan(s)
