"""The study's figures (PNG) from its result files: matplotlib through its object API with the Agg
canvas (no pyplot, no global backend)."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.study.labels import COLOURS, LABELS
from experiments.study.result_files import _num, _ordered


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
