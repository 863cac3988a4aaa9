"""The study's report (experiments/study/report.py): tables and figures from result files of fake runs."""

from __future__ import annotations

import math

import pytest

from experiments.study import experiments as ex
from experiments.study.harness import RunConfig, kw
from experiments.study.report import markdown_table, report

pytest.importorskip("matplotlib")


def fake_runner(cfg: RunConfig) -> dict:
    """Val accuracy peaks at lr 0.01 (the 3-point grid 0.01..0.1 gets one extension below);
    test accuracy 0.5 + seed/100 (+0.1 for gsgd); two epochs."""
    acc = 0.9 - 0.1 * abs(math.log10(cfg.lr / 0.01))
    test = 0.5 + cfg.seed / 100 + (0.1 if cfg.method == "gsgd" else 0.0)
    hist = [
        {"epoch": e, "step": e + 1, "train_loss": 1.0 / (e + 1 + cfg.rescale_spread), "val_loss": 1.0, "val_acc": acc}
        for e in range(2)
    ]
    return {
        "id": cfg.run_id(),
        "config": cfg.to_dict(),
        "history": hist,
        "val_acc": acc,
        "val_loss": 1 - acc,
        "test_acc": test,
        "test_loss": 1 - test,
        "diverged": False,
        "optimizer": "SGD",
        "steps": 2,
        "fit_s": 0.5,
        "loadavg": 0.0,
    }


def test_report_tables_and_figures(tmp_path):
    def setting(**model_kwargs):
        return ex.Setting(
            {"width": model_kwargs["width"]},
            RunConfig(method="sgd", lr=0.0, dataset="digits", model_kwargs=kw(**model_kwargs)),
        )

    width = ex.Experiment("width", "t", (setting(width=8), setting(width=16)), methods=("sgd", "gsgd"), grid_points=3)
    inv = ex.Experiment(
        "invariance", "t", (setting(width=8),), methods=("sgd", "gsgd"), spreads=(0.0, 1.0), grid_points=3
    )
    ex.run_experiment(width, tmp_path / "results" / "width", runner=fake_runner)
    ex.run_experiment(inv, tmp_path / "results" / "invariance", runner=fake_runner)
    figures = tmp_path / "figures"
    text = report(tmp_path / "results", figures)
    # seeds 1..5: test accuracy 0.51..0.55, mean 0.53, sample std 0.0158; G-SGD 0.1 higher
    # 3-point grid + one extension, times two schedules; the fake runner ties them: the first (constant) wins
    assert "| 8 | SGD | 0.01, constant | 8 | 53.0 +- 1.6 | 47.0 +- 1.6 |" in text
    assert "| 16 | G-SGD | 0.01, constant | 8 | 63.0 +- 1.6 | 37.0 +- 1.6 |" in text
    assert "### Invariance" in text and "### Depth" not in text
    names = {p.name for p in figures.iterdir()}
    assert names == {"width_test_error.png", "width_tuning.png", "invariance_test_acc.png", "invariance_train_loss.png"}
    assert all((figures / n).stat().st_size > 10_000 for n in names)


def test_markdown_table_marks_edges_and_missing_values():
    row = {
        "width": 8,
        "method": "path-sgd",
        "lr": 0.000123456,
        "lr_at_grid_edge": True,
        "schedule": "cosine",
        "grid_runs": 8,
        "test_acc_mean": math.nan,
        "test_acc_std": math.nan,
        "test_err_mean": math.nan,
        "test_loss_mean": 2.0,
        "test_loss_std": math.nan,
        "diverged": 5,
        "seeds": 5,
        "fit_s_mean": 1.0,
    }
    line = markdown_table([row], ["width"]).splitlines()[-1]
    assert line == "| 8 | Path-SGD | 0.000123 (edge), cosine | 8 | n/a | n/a | 2.000 | 5/5 | 1.0 |"


def test_issue19_figures_from_fake_result_files(tmp_path):
    import dataclasses

    from experiments.study.figures_mnist import figures

    exps = ex.experiments()
    for name in ("mnist-mlp", "bn-invariance"):
        exp = exps[name]
        setting = dataclasses.replace(exp.settings[0], base=dataclasses.replace(exp.settings[0].base, dataset="digits"))
        small = dataclasses.replace(exp, settings=(setting,), final_seeds=(1, 2), grid_points=3, reuse=())
        ex.run_experiment(small, tmp_path / "results" / name, runner=fake_runner)
    made = figures(tmp_path / "results", tmp_path / "figs")
    names = {p.name for p in made}
    assert {"mnist_mlp_test_error.png", "mnist_mlp_seeds.png", "bn_invariance_test_acc.png"} <= names
    assert all(p.exists() and p.stat().st_size > 1000 for p in made)
