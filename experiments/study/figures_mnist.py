"""PNG figures of the issue-19 study (real MNIST and the BatchNorm networks) from its result files.

    python -m experiments.study.figures_mnist --results results/study --figures docs/figures/study

Per experiment found under ``<results>/`` (``summary.json``, ``runs.csv``, ``curves.csv``): test error
per method with every final seed as a dot, training loss and validation accuracy per epoch (mean of
the final seeds), validation accuracy per epoch of every final seed (one panel per method), the lr
tuning runs; test error against width; test accuracy against the rescaling spread and training loss
per spread. Only numbers from the files are drawn; nothing is recomputed.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from experiments.study.labels import COLOURS, LABELS
from experiments.study.plots import (
    _figure,
    _save,
    plot_acc_vs_spread,
    plot_bars,
    plot_curves,
    plot_error_vs,
    plot_loss_by_spread,
    plot_tuning,
)
from experiments.study.result_files import _num, _ordered, load_curves, load_runs, load_summary

# experiment -> (file prefix, title)
SINGLE = {
    "mnist-mlp": ("mnist_mlp", "MLP 784-64x4-10 on real MNIST, 30 epochs"),
    "mnist-cnn": ("mnist_cnn", "Plain CNN (no BN) on real MNIST, 10 epochs"),
    "mnist-resnet18": ("mnist_resnet18", "ResNet-18 (width 8) on real MNIST, 5 epochs"),
    "bn-exact": ("bn_exact", "BN ResNet on MNIST-1D, 20 epochs"),
}
SPREAD = {
    "mnist-invariance": ("mnist_invariance", "MLP 784-64x4-10 on real MNIST, rescaled starts"),
    "bn-invariance": ("bn_invariance", "BN ResNet on MNIST-1D, S1+S2-rescaled starts"),
}


def plot_seed_curves(
    runs: dict[str, dict[str, str]], curves: dict[str, list[dict[str, float]]], path: Path, title: str
) -> Path:
    """Validation accuracy per epoch of every final seed (spread 0), one panel per method."""
    final = [k for k, r in runs.items() if r["phase"] == "final" and _num(r["rescale_spread"]) == 0.0]
    methods = _ordered(sorted({runs[k]["method"] for k in final}))
    ncols = min(3, len(methods))
    fig, axes = _figure(ncols, -(-len(methods) // ncols), size=(4.2, 3.2))
    flat = [ax for row in axes for ax in row]
    for ax in flat[len(methods) :]:
        ax.set_visible(False)
    for ax, m in zip(flat, methods):
        for k in sorted((k for k in final if runs[k]["method"] == m), key=lambda k: int(runs[k]["seed"])):
            c = curves.get(k, [])
            ax.plot([h["epoch"] + 1 for h in c], [100 * h["val_acc"] for h in c], color=COLOURS.get(m), alpha=0.8)
            if c:
                ax.annotate(runs[k]["seed"], (c[-1]["epoch"] + 1, 100 * c[-1]["val_acc"]), fontsize=7)
        ax.set_title(LABELS.get(m, m), fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("val accuracy %")
        ax.grid(alpha=0.3)
    fig.suptitle(title + ": every final seed (labelled at its last epoch)")
    return _save(fig, path)


def _seed_accs(runs: dict[str, dict[str, str]]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = defaultdict(list)
    for r in runs.values():
        if r["phase"] == "final" and _num(r["rescale_spread"]) == 0.0:
            out[r["method"]].append(_num(r["test_acc"]))
    return out


def figures(results: Path, out: Path) -> list[Path]:
    """Write every figure whose experiment has result files; return their paths."""
    made: list[Path] = []
    for name, (prefix, title) in SINGLE.items():
        folder = results / name
        rows = load_summary(folder)
        if not rows:
            continue
        runs, curves = load_runs(folder), load_curves(folder)
        made.append(plot_bars(rows, _seed_accs(runs), out / f"{prefix}_test_error.png", title))
        made.append(plot_curves(runs, curves, out / f"{prefix}_curves.png", title))
        made.append(plot_seed_curves(runs, curves, out / f"{prefix}_seeds.png", title))
        made.append(plot_tuning(runs, out / f"{prefix}_tuning.png", lambda r, n=name: n, "lr tuning, seed 0"))
    folder = results / "mnist-width"
    rows = load_summary(folder)
    if rows:
        title = "Bias-free MLPs 784-w-w-10 on real MNIST, 20 epochs"
        made.append(plot_error_vs(rows, "width", out / "mnist_width_test_error.png", title, log2=True))
        setting = lambda r: f"width {json.loads(r['model_kwargs'])['width']}"  # noqa: E731
        made.append(plot_tuning(load_runs(folder), out / "mnist_width_tuning.png", setting, title + ": lr tuning"))
    for name, (prefix, title) in SPREAD.items():
        folder = results / name
        rows = load_summary(folder)
        if not rows:
            continue
        runs, curves = load_runs(folder), load_curves(folder)
        made.append(plot_acc_vs_spread(rows, out / f"{prefix}_test_acc.png", title))
        methods = _ordered(sorted({r["method"] for r in rows}))
        made.append(plot_loss_by_spread(runs, curves, methods, out / f"{prefix}_train_loss.png"))
    return made


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=Path("results/study"))
    p.add_argument("--figures", type=Path, default=Path("docs/figures/study"))
    args = p.parse_args(argv)
    for path in figures(args.results, args.figures):
        print(path)


if __name__ == "__main__":
    main()
