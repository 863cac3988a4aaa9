"""Markdown tables and PNG figures of the study from its result files (``summary.json``, ``runs.csv``,
``curves.csv`` under ``<results>/<experiment>/``).

    python -m experiments.study.report --results results/study --figures docs/figures/study

prints the Markdown tables of every experiment found and writes the figures: test error against
width and against depth, final test accuracy against the rescaling spread, training-loss curves per
spread, the lr-tuning curves (validation accuracy against lr per setting), and the BN ResNet's
curves. Only numbers from the files are used; nothing is recomputed from models.

matplotlib is used through its object API with the Agg canvas (no pyplot, no global backend).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.study.labels import COLOURS, LABELS

METHOD_ORDER = ("gsgd", "sgd", "sgd+skeleton", "path-sgd")


# ---------------------------------------------------------------- loading
def load_summary(folder: Path) -> list[dict[str, Any]]:
    """The summary rows of one experiment (``[]`` when the file is missing)."""
    path = folder / "summary.json"
    return json.loads(path.read_text()) if path.exists() else []


def load_runs(folder: Path) -> dict[str, dict[str, str]]:
    """``runs.csv`` rows by run id."""
    with (folder / "runs.csv").open() as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def load_curves(folder: Path) -> dict[str, list[dict[str, float]]]:
    """``curves.csv`` rows (numbers as floats) grouped by run id, in epoch order."""
    out: dict[str, list[dict[str, float]]] = defaultdict(list)
    with (folder / "curves.csv").open() as f:
        for r in csv.DictReader(f):
            out[r["id"]].append({k: _num(v) for k, v in r.items() if k not in ("id", "method")})
    for rows in out.values():
        rows.sort(key=lambda h: h["epoch"])
    return out


def _num(v: str) -> float:
    try:
        return float(v)
    except ValueError:
        return math.nan


def _ordered(methods: Sequence[str]) -> list[str]:
    return [m for m in METHOD_ORDER if m in methods] + [m for m in methods if m not in METHOD_ORDER]


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


# ---------------------------------------------------------------- figures
def _figure(ncols: int, nrows: int = 1, size: tuple[float, float] = (5.0, 3.8)) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _method_lines(ax: Any, rows: Sequence[dict[str, Any]], x_key: str, mean_key: str, std_key: str) -> None:
    """One error-bar line per method: ``mean_key`` +- ``std_key`` (fractions, drawn in %) against ``x_key``."""
    for m in _ordered(sorted({r["method"] for r in rows})):
        pts = sorted((r[x_key], r[mean_key], r[std_key]) for r in rows if r["method"] == m)
        if not pts:
            continue
        x, y, e = zip(*pts)
        ax.errorbar(
            x,
            [100 * v for v in y],
            yerr=[100 * v for v in e],
            label=LABELS.get(m, m),
            color=COLOURS.get(m),
            marker="o",
            capsize=3,
        )


def plot_error_vs(rows: Sequence[dict[str, Any]], key: str, path: Path, title: str, log2: bool = False) -> Path:
    """Test error (mean +- std over the seeds) against ``key``, one line per method."""
    fig, axes = _figure(1, size=(6.5, 4.2))
    ax = axes[0][0]
    # the std of the error equals the std of the accuracy
    _method_lines(ax, rows, key, "test_err_mean", "test_acc_std")
    if log2:
        ax.set_xscale("log", base=2)
        xs = sorted({r[key] for r in rows})
        ax.set_xticks(xs, [str(v) for v in xs])
    else:
        ax.set_xticks(sorted({r[key] for r in rows}))
    ax.set_xlabel(key)
    ax.set_ylabel("test error % (mean +- std, 5 seeds)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_bars(rows: Sequence[dict[str, Any]], seeds: dict[str, list[float]], path: Path, title: str) -> Path:
    """Test error per method for one setting: bars (mean, std error bars) and every final seed as a dot."""
    fig, axes = _figure(1, size=(max(5.2, 0.95 * len(rows)), 3.9 if len(rows) <= 4 else 4.6))
    ax = axes[0][0]
    ms = _ordered([r["method"] for r in rows])
    by = {r["method"]: r for r in rows}
    x = range(len(ms))
    err = [100 * by[m]["test_err_mean"] for m in ms]
    std = [100 * by[m]["test_acc_std"] for m in ms]
    ax.bar(x, err, yerr=std, color=[COLOURS.get(m) for m in ms], alpha=0.55, capsize=4, label="mean +- std")
    for i, m in enumerate(ms):
        vals = seeds.get(m, [])
        ax.plot(
            [i] * len(vals),
            [100 * (1 - v) for v in vals],
            "o",
            color="black",
            markersize=4,
            label="one seed" if i == 0 else None,
        )
    few = len(ms) <= 4
    ax.set_xticks(list(x), [LABELS.get(m, m) for m in ms], rotation=15 if few else 30, ha="center" if few else "right")
    ax.set_ylabel("test error % (5 seeds)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def final_test_acc(runs: dict[str, dict[str, str]], model: str) -> dict[str, list[float]]:
    """Final-seed test accuracies per method for one model (spread 0)."""
    out: dict[str, list[float]] = defaultdict(list)
    for r in runs.values():
        if r["phase"] == "final" and r["model"] == model and float(r["rescale_spread"]) == 0.0:
            out[r["method"]].append(_num(r["test_acc"]))
    return out


def plot_acc_vs_spread(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Final test accuracy (mean +- std) against the rescaling spread ``s``, one line per method."""
    fig, axes = _figure(1, size=(6.5, 4.2))
    ax = axes[0][0]
    _method_lines(ax, rows, "rescale_spread", "test_acc_mean", "test_acc_std")
    ax.set_xlabel("spread s of the rescaling factors exp(U(-s, s))")
    ax.set_ylabel("final test accuracy % (mean +- std, 5 seeds)")
    ax.set_xticks(sorted({r["rescale_spread"] for r in rows}))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _mean_curve(curves: list[list[dict[str, float]]], key: str) -> tuple[list[float], list[float]]:
    n = min(len(c) for c in curves)
    xs = [curves[0][i]["epoch"] + 1 for i in range(n)]
    ys = []
    for i in range(n):
        vals = [c[i][key] for c in curves if math.isfinite(c[i][key])]
        ys.append(statistics.fmean(vals) if len(vals) == len(curves) else math.nan)
    return xs, ys


def plot_loss_by_spread(
    runs: dict[str, dict[str, str]],
    curves: dict[str, list[dict[str, float]]],
    methods: Sequence[str],
    path: Path,
    key: str = "train_loss",
) -> Path:
    """One panel per method: ``key`` per epoch (mean over the final seeds), one line per spread."""
    spreads = sorted({float(r["rescale_spread"]) for r in runs.values() if r["phase"] == "final"})
    cmap = ("black", "tab:blue", "tab:orange", "tab:red", "tab:brown", "tab:gray")
    ncols = min(2, len(methods))
    fig, axes = _figure(ncols, -(-len(methods) // ncols), size=(5.6, 3.9))
    flat = [ax for row in axes for ax in row]
    for ax in flat[len(methods) :]:
        ax.set_visible(False)
    for ax, m in zip(flat, methods):
        for i, s in enumerate(spreads):
            ids = [
                k
                for k, r in runs.items()
                if r["phase"] == "final" and r["method"] == m and float(r["rescale_spread"]) == s and k in curves
            ]
            if not ids:
                continue
            ok = [k for k in ids if runs[k]["diverged"] != "True"]
            bad = len(ids) - len(ok)
            label = f"s = {s:g}" + (f" ({bad}/{len(ids)} diverged, not in the mean)" if bad else "")
            x, y = _mean_curve([curves[k] for k in ok], key) if ok else ([], [])
            style = "-" if i == 0 else "--"
            ax.plot(x, y, style, color=cmap[i % len(cmap)], label=label, linewidth=2.2 - 0.3 * i)
        ax.set_yscale("log")
        ax.set_title(f"{LABELS.get(m, m)}")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for row in axes:
        row[0].set_ylabel(f"{key.replace('_', ' ')} (mean over seeds, log)")
    fig.suptitle("Training loss from rescaled starts (hidden units scaled by exp(U(-s, s)))")
    return _save(fig, path)


def plot_tuning(runs: dict[str, dict[str, str]], path: Path, setting_of: Any, title: str) -> Path:
    """Validation accuracy of every tuning run against its lr; one panel per setting, a line per method."""
    settings: dict[str, list[dict[str, str]]] = defaultdict(list)
    for r in runs.values():
        if r["phase"] == "tune" and float(r["rescale_spread"]) == 0.0:
            settings[setting_of(r)].append(r)
    keys = sorted(settings, key=_natural)
    ncols = min(3, len(keys))
    nrows = -(-len(keys) // ncols)
    fig, axes = _figure(ncols, nrows, size=(4.4, 3.4))
    flat = [ax for row in axes for ax in row]
    for ax, key in zip(flat, keys):
        for m in _ordered(sorted({r["method"] for r in settings[key]})):
            for sched in sorted({r.get("schedule", "constant") for r in settings[key] if r["method"] == m}):
                pts = sorted(
                    (float(r["lr"]), _num(r["val_acc"]), r["diverged"] == "True")
                    for r in settings[key]
                    if r["method"] == m and r.get("schedule", "constant") == sched
                )
                x = [p[0] for p in pts]
                y = [math.nan if p[2] else 100 * p[1] for p in pts]
                style = "-" if sched == "constant" else "--"
                label = LABELS.get(m, m) + ("" if sched == "constant" else f" ({sched})")
                ax.plot(x, y, style, marker="o", color=COLOURS.get(m), label=label)
                bad = [p[0] for p in pts if p[2]]
                if bad:
                    ax.plot(bad, [10.0] * len(bad), "x", color=COLOURS.get(m), markersize=8)
        ax.set_xscale("log")
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("learning rate")
        ax.set_ylabel("val accuracy % (seed 0)")
        ax.grid(alpha=0.3)
    for ax in flat[len(keys) :]:
        ax.set_visible(False)
    flat[0].legend(fontsize=7)
    fig.suptitle(title + " (x at 10%: diverged)")
    return _save(fig, path)


def _natural(s: str) -> tuple[Any, ...]:
    return tuple(int(t) if t.isdigit() else t for t in s.replace("=", " ").split())


def plot_curves(
    runs: dict[str, dict[str, str]], curves: dict[str, list[dict[str, float]]], path: Path, title: str
) -> Path:
    """Training loss and validation accuracy per epoch (mean of the final seeds) for each method."""
    fig, axes = _figure(2, size=(5.0, 3.8))
    methods = _ordered(sorted({r["method"] for r in runs.values()}))
    for m in methods:
        ids = [k for k, r in runs.items() if r["phase"] == "final" and r["method"] == m and k in curves]
        if not ids:
            continue
        for ax, key in zip(axes[0], ("train_loss", "val_acc")):
            x, y = _mean_curve([curves[k] for k in ids], key)
            ax.plot(x, [v * (100 if key == "val_acc" else 1) for v in y], color=COLOURS.get(m), label=LABELS.get(m, m))
    axes[0][0].set_yscale("log")
    axes[0][0].set_ylabel("training loss (mean of 5 seeds)")
    axes[0][1].set_ylabel("validation accuracy % (mean of 5 seeds)")
    for ax in axes[0]:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return _save(fig, path)


# ---------------------------------------------------------------- the whole report
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
