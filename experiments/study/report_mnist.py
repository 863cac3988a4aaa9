"""Markdown tables of the real-MNIST study (issue 19) from its result files; nothing is recomputed.

    python -m experiments.study.report_mnist --results results/study

reads ``<results>/mnist-{mlp,width,cnn,invariance,resnet18}/`` and ``<results>/bn-{exact,invariance}/``
(``summary.json``, ``runs.csv``, ``curves.csv``)
and ``<results>/mnist-timing/timing.json`` and prints one table per experiment, the per-seed test
accuracies, the invariance distances and the timing table.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.study.labels import LABELS
from experiments.study.report import _pm, invariance_table
from experiments.study.result_files import _num, load_curves, load_runs, load_summary

SETTING_KEYS = ("model", "width", "rescale_spread")
EXPERIMENTS = (
    "mnist-mlp",
    "mnist-width",
    "mnist-cnn",
    "mnist-invariance",
    "bn-exact",
    "bn-invariance",
    "mnist-resnet18",
)


def _setting(row: dict[str, Any], spread: bool) -> str:
    keys = [k for k in SETTING_KEYS if k in row and (spread or k != "rescale_spread")]
    return ", ".join(f"s = {row[k]:g}" if k == "rescale_spread" else f"{k} {row[k]}" for k in keys)


def _epochs(runs: dict[str, dict[str, str]], curves: dict[str, list[dict[str, float]]]) -> dict[str, int]:
    return {k: len(curves.get(k, [])) for k in runs}


def summary_table(folder: Path) -> str:
    """Setting, method, chosen lr and schedule, grid runs, test accuracy and loss (mean +- std over the
    final seeds), diverged, and fit seconds per epoch of the final runs (mean)."""
    rows, runs, curves = load_summary(folder), load_runs(folder), load_curves(folder)
    head = ["setting", "method", "chosen lr, schedule", "grid runs", "test acc % (5 seeds)", "test loss"]
    head += ["diverged", "s/epoch (final runs)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        final = [
            k
            for k, x in runs.items()
            if x["phase"] == "final"
            and x["method"] == r["method"]
            and _num(x["lr"]) == r["lr"]
            and x["schedule"] == r["schedule"]
            and _num(x["rescale_spread"]) == r.get("rescale_spread", 0.0)
            and _label_matches(x, r)
        ]
        per_epoch = [_num(runs[k]["fit_s"]) / max(len(curves.get(k, [])), 1) for k in final]
        spe = f"{sum(per_epoch) / len(per_epoch):.2f}" if per_epoch else "n/a"
        lr = f"{r['lr']:.3g}" + (" (edge)" if r["lr_at_grid_edge"] else "") + f", {r['schedule']}"
        cells = [
            _setting(r, "invariance" in folder.name),
            LABELS.get(r["method"], r["method"]),
            lr,
            str(r["grid_runs"]),
        ]
        cells += [_pm(r["test_acc_mean"], r["test_acc_std"], digits=2)]
        cells += [_pm(r["test_loss_mean"], r["test_loss_std"], scale=1.0, digits=3)]
        cells += [f"{r['diverged']}/{r['seeds']}", spe]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _label_matches(run: dict[str, str], row: dict[str, Any]) -> bool:
    if "width" not in row:
        return True
    return json.loads(run["model_kwargs"]).get("width") == row["width"]


def per_seed(folder: Path) -> str:
    """Final-seed test accuracies (%) per setting and method, in seed order."""
    runs = load_runs(folder)
    acc: dict[tuple[str, str, float], list[tuple[int, float]]] = defaultdict(list)
    for x in runs.values():
        if x["phase"] == "final":
            width = json.loads(x["model_kwargs"]).get("width", "")
            acc[(str(width), x["method"], _num(x["rescale_spread"]))].append((int(x["seed"]), _num(x["test_acc"])))
    out = []
    for (width, m, s), vals in sorted(acc.items(), key=lambda kv: (kv[0][0].zfill(5), list(LABELS).index(kv[0][1]))):
        if s != 0.0:
            continue
        seeds = ", ".join(f"{100 * a:.1f}" for _, a in sorted(vals))
        out.append(f"- {('width ' + width + ', ') if width and 'width' in folder.name else ''}{LABELS[m]}: {seeds}")
    return "\n".join(out)


def drift_table(
    runs: dict[str, dict[str, str]], curves: dict[str, list[dict[str, float]]], epochs: Sequence[int] = (1, 2, 3, 5, 10)
) -> str:
    """Per method and spread s > 0: the relative change of the training loss (mean over the epoch's
    steps) against the s = 0 run of the same method and seed, at the given epochs (median over seeds;
    ``curves.csv`` keeps 6 significant digits, so changes below about 1e-6 read as 0)."""
    final = {(r["method"], _num(r["rescale_spread"]), r["seed"]): k for k, r in runs.items() if r["phase"] == "final"}
    head = ["method", "s"] + [f"epoch {e}" for e in epochs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    methods = [m for m in LABELS if any(k[0] == m for k in final)]
    for m in methods:
        for sp in sorted({s for mm, s, _ in final if mm == m and s > 0}):
            per_epoch: list[list[float]] = [[] for _ in epochs]
            for (mm, ss, seed), k in final.items():
                if mm != m or ss != sp or (m, 0.0, seed) not in final:
                    continue
                a, b = curves.get(final[(m, 0.0, seed)], []), curves.get(k, [])
                for i, e in enumerate(epochs):
                    if e <= min(len(a), len(b)):
                        x, y = a[e - 1]["train_loss"], b[e - 1]["train_loss"]
                        per_epoch[i].append(abs(x - y) / abs(x))
            cells = [
                "n/a" if not v else f"{statistics.median(v):.1e}" if all(map(math.isfinite, v)) else "diverged"
                for v in per_epoch
            ]
            lines.append("| " + " | ".join([LABELS[m], f"{sp:g}", *cells]) + " |")
    return "\n".join(lines)


def timing_table(path: Path) -> str:
    """Seconds per epoch (median over rounds) and the median ratio to SGD of the same round."""
    data = json.loads(path.read_text())
    meta = data["meta"]
    lines = [
        f"({meta['rounds']} rounds of {meta['epochs']}-epoch runs, {meta['threads']} thread, load average "
        f"{meta['loadavg_before']:.1f} before and {meta['loadavg_after']:.1f} after, {meta['cpus']} cores)",
        "",
        "| setting | method | s/epoch (median) | min-max | ratio to SGD (same round, median) |",
        "|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        setting = r.get("model") or f"MLP 784-{r['width']}-{r['width']}-10"
        cells = [setting, LABELS[r["method"]], f"{r['s_per_epoch_median']:.3f}"]
        cells += [f"{r['s_per_epoch_min']:.3f}-{r['s_per_epoch_max']:.3f}", f"{r['ratio_to_sgd_median']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(results: Path) -> str:
    """All tables that have result files, as Markdown."""
    out = []
    for name in EXPERIMENTS:
        folder = results / name
        if not (folder / "summary.json").exists():
            continue
        out += [f"### {name} (`{folder}/`)", "", summary_table(folder), "", "Per seed (test accuracy %):", ""]
        out += [per_seed(folder), ""]
        if "invariance" in name:
            runs, curves = load_runs(folder), load_curves(folder)
            out += [invariance_table(runs, curves), "", drift_table(runs, curves), ""]
    for folder in ("mnist-timing", "bn-timing"):
        timing = results / folder / "timing.json"
        if timing.exists():
            out += [f"### timing (`{timing}`)", "", timing_table(timing), ""]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=Path("results/study"))
    print(report(p.parse_args(argv).results))


if __name__ == "__main__":
    main()
