"""Markdown tables and PNG figures of the study from its result files (``summary.json``, ``runs.csv``,
``curves.csv`` under ``<results>/<experiment>/``).

    python -m experiments.study.report --results results/study --figures docs/figures/study

prints the Markdown tables of every experiment found and writes the figures: test error against
width and against depth, final test accuracy against the rescaling spread, training-loss curves per
spread, the lr-tuning curves (validation accuracy against lr per setting), and the BN ResNet's
curves. Only numbers from the files are used; nothing is recomputed from models.

The result files are read by :mod:`experiments.study.result_files`, the figures drawn by
:mod:`experiments.study.plots`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.study.labels import LABELS
from experiments.study.plots import (
    plot_acc_vs_spread,
    plot_bars,
    plot_curves,
    plot_error_vs,
    plot_loss_by_spread,
    plot_tuning,
)
from experiments.study.result_files import _num, _ordered, final_test_acc, load_curves, load_runs, load_summary


# ---------------------------------------------------------------- tables
def _pm(mean: float, std: float, scale: float = 100.0, digits: int = 1) -> str:
    if not math.isfinite(mean):
        return "n/a"
    s = f"{scale * mean:.{digits}f}"
    return s + (f" +- {scale * std:.{digits}f}" if math.isfinite(std) else "")


def markdown_table(rows: Sequence[dict[str, Any]], setting_keys: Sequence[str]) -> str:
    """One Markdown table: setting, method, chosen lr and schedule, grid runs, test accuracy/error/loss, diverged."""
    head = [*setting_keys, "method", "chosen lr, schedule", "grid runs", "test acc % (5 seeds)", "test error %"]
    head += ["test loss", "diverged", "fit s/run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lr = f"{r['lr']:.3g}" + (" (edge)" if r["lr_at_grid_edge"] else "") + f", {r['schedule']}"
        cells = [str(r[k]) for k in setting_keys] + [LABELS.get(r["method"], r["method"]), lr, str(r["grid_runs"])]
        cells += [
            _pm(r["test_acc_mean"], r["test_acc_std"]),
            _pm(r["test_err_mean"], r["test_acc_std"]),
            _pm(r["test_loss_mean"], r["test_loss_std"], scale=1.0, digits=3),
            f"{r['diverged']}/{r['seeds']}",
            f"{r['fit_s_mean']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _setting_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    keys = [k for k in rows[0] if k not in _ROW_FIELDS]
    varying = [k for k in keys if len({str(r[k]) for r in rows}) > 1]
    return varying or keys[:1]


_ROW_FIELDS = {
    "method",
    "lr",
    "schedule",
    "tune_val_acc",
    "grid_runs",
    "lr_at_grid_edge",
    "seeds",
    "diverged",
    "test_acc_mean",
    "test_acc_std",
    "test_err_mean",
    "test_loss_mean",
    "test_loss_std",
    "fit_s_mean",
}


def invariance_table(
    runs: dict[str, dict[str, str]], curves: dict[str, list[dict[str, float]]], tol: float = 1e-3
) -> str:
    """How far each rescaled run moved from the unscaled run of the same method and seed.

    Per method and spread ``s > 0``, over the final seeds: the first epoch (1-based) whose training
    loss differs from the ``s = 0`` run's by more than ``tol`` relative (median over seeds; "never"
    when it stays within ``tol`` to the end), and the mean absolute change of the final test accuracy.
    """
    final = {(r["method"], float(r["rescale_spread"]), r["seed"]): k for k, r in runs.items() if r["phase"] == "final"}
    lines = [
        f"| method | s | first epoch with train-loss change > {tol:g} (median over seeds) "
        "| mean abs change of final test acc (points) | diverged |",
        "|---|---|---|---|---|",
    ]
    methods = _ordered(sorted({m for m, _, _ in final}))
    spreads = sorted({s for _, s, _ in final if s > 0})
    for m in methods:
        for sp in spreads:
            firsts, deltas, bad = [], [], 0
            for (mm, ss, seed), k in final.items():
                if mm != m or ss != sp or (m, 0.0, seed) not in final:
                    continue
                k0 = final[(m, 0.0, seed)]
                bad += runs[k]["diverged"] == "True"
                deltas.append(abs(_num(runs[k]["test_acc"]) - _num(runs[k0]["test_acc"])))
                a, b = curves.get(k0, []), curves.get(k, [])
                first = math.inf
                for e in range(max(len(a), len(b))):
                    if e >= min(len(a), len(b)):
                        first = e + 1
                        break
                    x, y = a[e]["train_loss"], b[e]["train_loss"]
                    if not (math.isfinite(x) and math.isfinite(y)) or abs(x - y) > tol * abs(x):
                        first = e + 1
                        break
                firsts.append(first)
            if not firsts:
                continue
            med = statistics.median(firsts)
            med_s = "never" if math.isinf(med) else f"{med:g}"
            change = 100 * statistics.fmean(deltas)
            lines.append(f"| {LABELS.get(m, m)} | {sp:g} | {med_s} | {change:.1f} | {bad}/{len(firsts)} |")
    return "\n".join(lines)


def report(results: Path, figures: Path) -> str:
    """Write every figure for the experiments found under ``results``; return the Markdown tables."""
    out = []
    w = results / "width"
    rows = load_summary(w)
    if rows:
        out.append("### Width\n\n" + markdown_table(rows, ["width"]))
        plot_error_vs(rows, "width", figures / "width_test_error.png", "MLP 40-w-w-10 on MNIST-1D", log2=True)
        plot_tuning(
            load_runs(w),
            figures / "width_tuning.png",
            lambda r: f"width {json.loads(r['model_kwargs'])['width']}",
            "Width sweep: lr tuning",
        )
    d = results / "depth"
    rows = load_summary(d)
    if rows:
        out.append("### Depth\n\n" + markdown_table(rows, ["model", "depth"]))
        mlp = [r for r in rows if r["model"] == "plain_mlp"]
        cnn = [r for r in rows if r["model"] == "plain_cnn"]
        if mlp:
            plot_error_vs(mlp, "depth", figures / "depth_test_error.png", "Plain MLPs (width 64) on MNIST-1D")
        if cnn:
            seeds = final_test_acc(load_runs(d), "plain_cnn")
            plot_bars(cnn, seeds, figures / "cnn_test_error.png", "Plain CNN (8 weight layers, no BN)")

        def setting(r: dict[str, str]) -> str:
            k = json.loads(r["model_kwargs"])
            return "plain CNN" if r["model"] == "plain_cnn" else f"MLP depth {k.get('depth')}"

        plot_tuning(load_runs(d), figures / "depth_tuning.png", setting, "Depth sweep: lr tuning")
    i = results / "invariance"
    rows = load_summary(i)
    if rows:
        out.append("### Invariance\n\n" + markdown_table(rows, ["rescale_spread"]))
        plot_acc_vs_spread(rows, figures / "invariance_test_acc.png", "Rescaled starts, plain MLP depth 6")
        runs, curves = load_runs(i), load_curves(i)
        out.append("Distance from the unscaled run (same method and seed):\n\n" + invariance_table(runs, curves))
        methods = _ordered(sorted({r["method"] for r in rows}))
        plot_loss_by_spread(runs, curves, methods, figures / "invariance_train_loss.png")
    b = results / "bn-resnet"
    rows = load_summary(b)
    if rows:
        out.append("### BN ResNet\n\n" + markdown_table(rows, ["model"]))
        runs = load_runs(b)
        plot_curves(runs, load_curves(b), figures / "bn_resnet_curves.png", "BN ResNet on MNIST-1D")
        plot_bars(rows, final_test_acc(runs, "bn_resnet"), figures / "bn_resnet_test_error.png", "BN ResNet")
        plot_tuning(runs, figures / "bn_resnet_tuning.png", lambda r: "BN ResNet", "BN ResNet: lr tuning")
    return "\n\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=Path("results/study"))
    p.add_argument("--figures", type=Path, default=Path("docs/figures/study"))
    args = p.parse_args(argv)
    print(report(args.results, args.figures))


if __name__ == "__main__":
    main()
