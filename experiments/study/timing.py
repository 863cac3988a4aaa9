"""Wall-clock cost of each method: seconds per training epoch, measured side by side.

    python -m experiments.study.timing [--out results/study] [--epochs 3] [--rounds 3]

For every setting of the real-MNIST experiments (``mnist-mlp``, ``mnist-width``, ``mnist-cnn``) and
every method of that experiment, ``rounds`` rounds of one ``epochs``-epoch run each (through
Lightning, the run's validation pass included, as in the study), with the method order rotated from
round to round so that a change of the machine's load falls on every method alike. Per run: fit
seconds / epochs. Per setting and method: the median over rounds, and the median over rounds of the
ratio to SGD's run of the same round. Writes ``<out>/<folder>/timing.csv`` and ``timing.json``
(``--folder``, default ``mnist-timing``); reruns measure again (timings are not resumed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from experiments.study.experiments import ADAM_CENTRE, ADAM_FAMILY, SGD_CENTRE, Experiment, experiments
from experiments.study.harness import RunConfig, kw, run_one
from experiments.study.protocol import _write_csv

TIMED = ("mnist-mlp", "mnist-width", "mnist-cnn")


def time_setting(exp: Experiment, base: RunConfig, epochs: int, rounds: int, runner=run_one) -> dict[str, list[float]]:
    """Seconds per epoch of each method of ``exp`` on ``base``, one list entry per round."""
    out: dict[str, list[float]] = {m: [] for m in exp.methods}
    for r in range(rounds):
        k = r % len(exp.methods)
        for m in exp.methods[k:] + exp.methods[:k]:
            lr = ADAM_CENTRE if m in ADAM_FAMILY else SGD_CENTRE
            cfg = dataclasses.replace(
                base, method=m, lr=lr, epochs=epochs, gsgd_kwargs=kw(**exp.gsgd_kwargs), **exp.overrides.get(m, {})
            )
            res = runner(cfg)
            out[m].append(res["fit_s"] / epochs)
    return out


def summarize_timing(label: dict[str, Any], per_epoch: dict[str, list[float]]) -> list[dict[str, Any]]:
    """Rows: median seconds per epoch and median ratio to SGD (same round) per method."""
    rows = []
    for m, secs in per_epoch.items():
        ratios = [a / b for a, b in zip(secs, per_epoch["sgd"])] if "sgd" in per_epoch else []
        rows.append(
            {
                **label,
                "method": m,
                "rounds": len(secs),
                "s_per_epoch_median": statistics.median(secs),
                "s_per_epoch_min": min(secs),
                "s_per_epoch_max": max(secs),
                "ratio_to_sgd_median": statistics.median(ratios) if ratios else float("nan"),
            }
        )
    return rows


def run_timing(
    out: Path, epochs: int, rounds: int, names: Sequence[str] = TIMED, runner=run_one, folder: str = "mnist-timing"
) -> list[dict]:
    """Time every setting and method of the experiments ``names``; write the tables to ``out/folder``;
    return the rows."""
    exps = experiments(epochs=epochs)
    rows: list[dict[str, Any]] = []
    load_before = os.getloadavg()[0]
    for name in names:
        exp = exps[name]
        for setting in exp.settings:
            per_epoch = time_setting(exp, setting.base, epochs, rounds, runner)
            rows += summarize_timing({"experiment": name, **setting.label}, per_epoch)
    dest = out / folder
    dest.mkdir(parents=True, exist_ok=True)
    _write_csv(dest / "timing.csv", rows)
    meta = {
        "epochs": epochs,
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg()[0],
        "cpus": os.cpu_count(),
    }
    (dest / "timing.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results/study"))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", type=lambda v: v.split(","), default=list(TIMED), help="experiments to time")
    p.add_argument("--folder", default="mnist-timing", help="output folder under --out")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    for row in run_timing(args.out, args.epochs, args.rounds, args.only, folder=args.folder):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
