"""Plot the ``gsgd/*`` diagnostics of a Lightning ``CSVLogger`` log, G-SGD beside SGD.

Command line::

    python -m lightning_gsgd.diagnostics.plot logs/gsgd/version_0/metrics.csv \\
        --compare logs/sgd/version_0/metrics.csv --labels G-SGD SGD -o gsgd.png

draws one panel per curve against the step: the losses and accuracies the run logged, then
``path_grad_norm``, ``basis_path_norm``, the skeleton-path ``|v|`` (min / median / max in one
panel), ``imbalance``, ``relative_update``, ``guard_hits``, ``skipped_steps``, ``steps`` and any other
step-wise ``gsgd/`` key. A second run (``--compare``) is drawn on the same axes. Keys a run did not
log are skipped for that run with a note (in the panel and in the log); keys logged once (the
fit-start summary: chains, hidden units, basis paths, coverage) are printed under the grid.

matplotlib is an optional dependency (``pip install "lightning-gsgd[plot]"``); it is imported only
when a plot is drawn, and only through its object API with the Agg canvas (no pyplot, no global
backend switch).
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Series of one run: column name -> (steps, values), rows without a value left out.
Series = dict[str, tuple[list[float], list[float]]]

_ORDER = (
    "path_grad_norm",
    "basis_path_norm",
    "skeleton",
    "imbalance",
    "relative_update",
    "guard_hits",
    "skipped_steps",
    "steps",
    "invariance_residual",
)
_TITLES = {
    "path_grad_norm": "||dL/dv|| over basis paths",
    "basis_path_norm": "||v|| over basis paths",
    "skeleton": "skeleton paths |v|: min / median / max",
    "imbalance": "imbalance: std of log(||in|| / ||out||)",
    "relative_update": "relative update ||dv|| / ||v||",
    "guard_hits": "guard hits (cumulative)",
    "skipped_steps": "skipped steps (cumulative)",
    "steps": "G-SGD steps taken (cumulative)",
    "invariance_residual": "invariance residual (relative)",
}
_SKELETON = ("skeleton_abs_min", "skeleton_abs_median", "skeleton_abs_max")
_SKELETON_STYLE = {"skeleton_abs_min": ":", "skeleton_abs_median": "-", "skeleton_abs_max": "--"}
_COLOURS = ("tab:blue", "tab:orange")
_COUNTERS = ("guard_hits", "skipped_steps", "steps")
_PER_CHAIN = re.compile(r"chain\d+/")


@dataclass
class PlotReport:
    """What :func:`plot_metrics` drew.

    Attributes:
        path: The PNG written.
        panels: Panel titles, in grid order.
        notes: One line per key a run did not log (also sent to this module's logger).
    """

    path: Path
    panels: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class _Panel:
    title: str
    ylabel: str
    columns: list[str]  # one column, or the three skeleton columns


def read_metrics_csv(path: str | Path) -> Series:
    """Read a Lightning ``CSVLogger`` ``metrics.csv`` into per-column ``(steps, values)`` lists.

    Every row carries ``step`` and only the columns logged at that step; empty cells are skipped.

    Raises:
        ValueError: The file has no ``step`` column, or no rows.
    """
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "step" not in reader.fieldnames:
            raise ValueError(f"{path}: not a Lightning CSVLogger metrics file (no 'step' column)")
        series: Series = {name: ([], []) for name in reader.fieldnames if name not in ("step", "epoch")}
        rows = 0
        for row in reader:
            rows += 1
            step = float(row["step"])
            for name, (steps, values) in series.items():
                cell = row.get(name)
                if cell is None or cell == "":
                    continue
                steps.append(step)
                values.append(float(cell))
    if rows == 0:
        raise ValueError(f"{path}: no rows")
    return {k: v for k, v in series.items() if v[0]}


def _default_panels(runs: list[Series], prefix: str, per_chain: bool) -> tuple[list[_Panel], list[str]]:
    """Panels for every curve any run logged, and the single-valued prefixed keys (the summary)."""
    names = sorted({k for run in runs for k in run})
    stepwise = {k for k in names if max(len(run.get(k, ([], []))[0]) for run in runs) > 1}
    summary = [k for k in names if k.startswith(prefix) and k not in stepwise]
    plain = [k for k in names if not k.startswith(prefix) and re.search(r"loss|acc", k, re.IGNORECASE)]
    plain.sort(key=lambda k: (0 if "loss" in k.lower() else 1, k))
    panels = [_Panel(k, k, [k]) for k in plain if k in stepwise]
    ours = [k[len(prefix) :] for k in names if k.startswith(prefix) and k in stepwise]
    chains = [k for k in ours if _PER_CHAIN.match(k)]
    ours = [k for k in ours if not _PER_CHAIN.match(k)]
    rank = {name: i for i, name in enumerate(_ORDER)}
    groups: dict[str, list[str]] = {}
    for k in ours:
        groups.setdefault("skeleton" if k in _SKELETON else k, []).append(k)
    for g in sorted(groups, key=lambda g: (rank.get(g, len(rank)), g)):
        cols = sorted(groups[g], key=lambda k: _SKELETON.index(k) if k in _SKELETON else 0)
        panels.append(_Panel(_TITLES.get(g, g), "|v|" if g == "skeleton" else g, [prefix + c for c in cols]))
    if per_chain:
        panels += [_Panel(k, k.split("/", 1)[1], [prefix + k]) for k in chains]
    elif chains:
        log.info("per-chain keys not plotted (%d of them); pass per_chain=True / --per-chain", len(chains))
    return panels, summary


def _log_scale(values: list[float]) -> bool:
    finite = [v for v in values if math.isfinite(v)]
    return bool(finite) and min(finite) > 0 and max(finite) / min(finite) > 100


def _fmt(key: str, value: float) -> str:
    if key.endswith("coverage"):
        return f"{100 * value:.1f}%"
    return str(int(value)) if value == int(value) else f"{value:.4g}"


def plot_metrics(
    metrics_csv: str | Path,
    out: str | Path,
    *,
    compare: str | Path | None = None,
    labels: Sequence[str] = ("G-SGD", "SGD"),
    keys: Sequence[str] | None = None,
    prefix: str = "gsgd/",
    per_chain: bool = False,
    ncols: int = 3,
    title: str | None = None,
) -> PlotReport:
    """Draw the curves of one or two CSVLogger runs into a PNG grid.

    Args:
        metrics_csv: The (G-SGD) run's ``metrics.csv``.
        out: Where to write the PNG.
        compare: A second run (typically the SGD baseline), drawn on the same axes.
        labels: Legend names of the runs, in the order ``metrics_csv``, ``compare``.
        keys: Exact column names to plot, one panel each; default: every loss/accuracy column and
            every step-wise ``prefix`` column (skeleton statistics share a panel).
        prefix: The diagnostics' key prefix.
        per_chain: Also plot ``prefix + "chain<i>/..."`` keys, one panel each.
        ncols: Panels per row.
        title: Figure title (default: the run labels).

    Returns:
        A :class:`PlotReport`.

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: A file is not a CSVLogger metrics file, or nothing is left to plot.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - exercised by monkeypatching in the tests
        raise ImportError(
            'lightning_gsgd.diagnostics.plot needs matplotlib: pip install "lightning-gsgd[plot]" '
            "(or pip install matplotlib)"
        ) from e

    paths = [Path(metrics_csv)] + ([Path(compare)] if compare is not None else [])
    if len(labels) < len(paths):
        raise ValueError(f"plot_metrics: {len(paths)} runs but only {len(labels)} label(s)")
    runs = [read_metrics_csv(p) for p in paths]
    if keys is None:
        panels, summary = _default_panels(runs, prefix, per_chain)
    else:
        panels, summary = [_Panel(k, k[len(prefix) :] if k.startswith(prefix) else k, [k]) for k in keys], []
    report = PlotReport(Path(out))
    drawable: list[_Panel] = []
    for panel in panels:
        if any(c in run for run in runs for c in panel.columns):
            drawable.append(panel)
        else:
            note = f"'{panel.columns[0]}' is in none of the runs: skipped"
            report.notes.append(note)
            log.warning(note)
    if not drawable:
        raise ValueError(f"plot_metrics: nothing to plot in {', '.join(map(str, paths))}")

    nrows = math.ceil(len(drawable) / ncols)
    ncols_used = min(ncols, len(drawable))
    fig = Figure(figsize=(5.2 * ncols_used, 3.6 * nrows + 0.9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols_used, squeeze=False)
    for ax in axes.flat[len(drawable) :]:
        ax.set_visible(False)
    for ax, panel in zip(axes.flat, drawable):
        _draw_panel(ax, panel, runs, labels, report)
        report.panels.append(panel.title)
    lines = []
    for label, run in zip(labels, runs):
        items = [f"{k[len(prefix) :]} {_fmt(k, run[k][1][0])}" for k in summary if k in run]
        if items:
            lines.append(f"{label}: " + ", ".join(items))
    if lines:
        fig.supxlabel("\n".join(lines), fontsize=9, color="0.25")
    fig.suptitle(title if title is not None else " vs ".join(labels[: len(runs)]), fontsize=13)
    report.path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(report.path, dpi=110)
    return report


def _draw_panel(ax: Any, panel: _Panel, runs: list[Series], labels: Sequence[str], report: PlotReport) -> None:
    values: list[float] = []
    missing: list[str] = []
    for r, (run, label) in enumerate(zip(runs, labels)):
        present = [c for c in panel.columns if c in run]
        if not present:
            missing.append(label)
            note = f"'{panel.columns[0]}' not logged by run '{label}': skipped for that run"
            report.notes.append(note)
            log.warning(note)
            continue
        for c in present:
            steps, vals = run[c]
            stat = c.rsplit("_", 1)[-1] if c.endswith(_SKELETON) else None
            name = label if stat is None else f"{label} {stat}"
            style = _SKELETON_STYLE.get(c.split("/")[-1], "-")
            marker = "o" if len(steps) <= 30 else None
            ax.plot(steps, vals, style, color=_COLOURS[r % len(_COLOURS)], label=name, marker=marker, markersize=3)
            values += vals
    if panel.columns[0].endswith(_COUNTERS):
        top = max([1.0] + [1.05 * v for v in values if math.isfinite(v)])
        ax.set_ylim(bottom=-0.04 * top, top=top)  # a line at 0 stays visible above the axis
        ax.yaxis.get_major_locator().set_params(integer=True)
    elif _log_scale(values):
        ax.set_yscale("log")
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(panel.ylabel)
    ax.grid(True, alpha=0.3)
    if missing:
        ax.text(
            0.98,
            0.02,
            "not logged: " + ", ".join(missing),
            transform=ax.transAxes,
            ha="right",
            va="bottom",
            fontsize=8,
            color="0.4",
        )
    if len(runs) > 1 or len(panel.columns) > 1:
        ax.legend(fontsize=8, ncols=2 if len(panel.columns) > 1 and len(runs) > 1 else 1)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: ``python -m lightning_gsgd.diagnostics.plot metrics.csv [--compare b.csv] -o out.png``."""
    parser = argparse.ArgumentParser(
        prog="python -m lightning_gsgd.diagnostics.plot",
        description="Plot the gsgd/* diagnostics (and losses) of a Lightning CSVLogger metrics.csv into a PNG grid.",
    )
    parser.add_argument("metrics_csv", type=Path, help="the G-SGD run's metrics.csv")
    parser.add_argument("--compare", type=Path, default=None, help="a second run's metrics.csv (e.g. SGD)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--labels", nargs="+", default=["G-SGD", "SGD"], help="run names (default: G-SGD SGD)")
    parser.add_argument("--keys", nargs="+", default=None, help="exact column names to plot (default: all)")
    parser.add_argument("--prefix", default="gsgd/", help="diagnostics key prefix (default: gsgd/)")
    parser.add_argument("--per-chain", action="store_true", help="also plot the per-chain keys")
    parser.add_argument("--ncols", type=int, default=3, help="panels per row (default: 3)")
    parser.add_argument("--title", default=None, help="figure title")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        report = plot_metrics(
            args.metrics_csv,
            args.output,
            compare=args.compare,
            labels=args.labels,
            keys=args.keys,
            prefix=args.prefix,
            per_chain=args.per_chain,
            ncols=args.ncols,
            title=args.title,
        )
    except (ImportError, ValueError, OSError) as e:
        parser.exit(2, f"error: {e}\n")
    log.info("wrote %s (%d panels)", report.path, len(report.panels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
