"""The study's experiments (issue 7), one command each.

    python -m experiments.study.experiments width      [--out results/study] [--threads 1]
    python -m experiments.study.experiments depth
    python -m experiments.study.experiments invariance
    python -m experiments.study.experiments bn-resnet
    python -m experiments.study.experiments width --estimate   # time one short run, print the budget
    python -m experiments.study.experiments width --plan       # list the settings and grids, run nothing

Each experiment writes ``<out>/<name>/``: ``runs.jsonl`` (every run, appended as it finishes, so a
rerun resumes), ``runs.csv``, ``curves.csv``, ``summary.csv`` and ``summary.json``.

Learning-rate grids have the same number of points for every method (``GRID_POINTS``, spaced by
sqrt(10)). SGD, SGD+skeleton and G-SGD share the grid centred on ``SGD_CENTRE``. Path-SGD divides each
gradient entry by ``gamma``, whose typical size depends on width and depth by orders of magnitude;
its grid is the same grid in units of the effective step at initialization: centred on
``SGD_CENTRE * median(gamma)`` of the setting's seed-0 initial weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from experiments.study.data import load_splits
from experiments.study.harness import RunConfig, initial_model, kw, run_one
from experiments.study.plan import (  # noqa: F401 (re-exported: the study's names live here too)
    ADAM_CENTRE,
    ADAM_FAMILY,
    ALL_METHODS,
    FINAL_SEEDS,
    GRID_POINTS,
    SCHEDULES,
    SGD_CENTRE,
    TUNE_SEEDS,
    Experiment,
    Setting,
)
from experiments.study.plan import base_config as _base
from experiments.study.plans_mnist import bn_experiments, mnist_experiments
from experiments.study.protocol import RunStore, evaluate_seeds, lr_grid, summarize, tune, write_tables
from lightning_gsgd.optim.path_sgd import path_scales


def experiments(epochs: int | None = None, epoch_scale: float = 1.0) -> dict[str, Experiment]:
    """The four experiments; ``epochs`` overrides every setting's epoch count, ``epoch_scale`` multiplies
    the defaults (60 for MLPs, 40 for the CNNs; rounded, at least 1)."""

    def e(default: int) -> int:
        return max(1, round(default * epoch_scale)) if epochs is None else epochs

    width = tuple(Setting({"width": w}, _base("mlp2", e(60), width=w)) for w in (32, 64, 128, 256, 512, 1024))
    depth = tuple(
        Setting({"model": "plain_mlp", "depth": d}, _base("plain_mlp", e(60), depth=d)) for d in (4, 6, 8, 10, 12)
    )
    depth += (Setting({"model": "plain_cnn", "depth": 8}, _base("plain_cnn", e(40))),)
    inv = (Setting({"model": "plain_mlp", "depth": 6}, _base("plain_mlp", e(60), depth=6)),)
    bn = (Setting({"model": "bn_resnet"}, dataclasses.replace(_base("bn_resnet", e(40)), weight_decay=5e-4)),)
    return {
        x.name: x
        for x in (
            Experiment("width", "2-hidden-layer MLPs of widths 32..1024 on MNIST-1D", width),
            Experiment("depth", "plain MLPs of depth 4..12 and a plain CNN (no BN) on MNIST-1D", depth),
            Experiment(
                "invariance",
                "runs from randomly rescaled copies of the initial weights, factors exp(U(-s, s))",
                inv,
                spreads=(0.0, 0.5, 1.0, 2.0, 3.0),
            ),
            Experiment(
                "bn-resnet",
                "a small BN ResNet on MNIST-1D: G-SGD (the authors' BN heuristic) vs SGD",
                bn,
                methods=("sgd", "gsgd"),
                gsgd_kwargs={"bn_mode": "authors_heuristic"},
            ),
            *mnist_experiments(e),
            *bn_experiments(e),
        )
    }


def reduce(
    exp: Experiment,
    only: dict[str, Sequence[str]] | None = None,
    methods: Sequence[str] | None = None,
    spreads: Sequence[float] | None = None,
    grid_points: int | None = None,
    schedules: Sequence[str] | None = None,
) -> Experiment:
    """A smaller version of ``exp`` with the same protocol (for a limited time budget).

    Args:
        exp: The experiment.
        only: Keep the settings whose label value for each key is one of the given values (compared
            as strings), e.g. ``{"width": ["32", "128"]}``.
        methods: Keep only these methods (in ``exp``'s order).
        spreads: Replace the rescaling spreads.
        grid_points: Points of every method's lr grid (the same for every method).
        schedules: Replace the schedules tuned with the lr (the same for every method).

    Raises:
        ValueError: A key, method or grid size that does not fit ``exp``, or nothing left to run.
    """
    settings = exp.settings
    for key, values in (only or {}).items():
        if not all(key in st.label for st in settings):
            raise ValueError(f"experiment {exp.name!r}: settings have no label {key!r} (labels: {settings[0].label})")
        settings = tuple(st for st in settings if str(st.label[key]) in set(values))
    if not settings:
        raise ValueError(f"experiment {exp.name!r}: no setting left after --only {only}")
    kept = exp.methods
    if methods is not None:
        unknown = set(methods) - set(exp.methods)
        if unknown:
            raise ValueError(f"experiment {exp.name!r} has no method(s) {sorted(unknown)}; it has {exp.methods}")
        kept = tuple(m for m in exp.methods if m in methods)
    if schedules is not None and (not schedules or set(schedules) - set(SCHEDULES)):
        raise ValueError(f"schedules={list(schedules)}: choose one or more of {SCHEDULES}")
    if grid_points is not None and grid_points < 3:
        raise ValueError(f"grid_points={grid_points}: at least 3 points are needed to have an interior")
    return dataclasses.replace(
        exp,
        settings=settings,
        methods=kept,
        spreads=exp.spreads if spreads is None else tuple(float(s) for s in spreads),  # 0 and 0.0 differ in run ids
        grid_points=exp.grid_points if grid_points is None else grid_points,
        schedules=exp.schedules if schedules is None else tuple(schedules),
    )


def grid_for(method: str, base: RunConfig, points: int = GRID_POINTS) -> list[float]:
    """The method's initial lr grid of ``points`` learning rates for a setting (see the module docstring)."""
    if method in ADAM_FAMILY:
        return lr_grid(ADAM_CENTRE, points)
    if method != "path-sgd":
        return lr_grid(SGD_CENTRE, points)
    splits = load_splits(base.dataset)
    model, topology = initial_model(dataclasses.replace(base, method="path-sgd", seed=0), splits)
    assert topology is not None
    gammas = []
    for chain in topology.chains:
        biases = [None if layer.bias is None else layer.bias.detach() for layer in chain.layers]
        gw, _ = path_scales([layer.weight3d().detach() for layer in chain.layers], biases)
        gammas += [g.flatten() for g in gw]
    return lr_grid(SGD_CENTRE * float(torch.cat(gammas).median()), points)


def run_experiment(exp: Experiment, out: Path, runner=run_one) -> list[dict[str, Any]]:
    """Tune, evaluate and write the tables of one experiment; returns the summary rows."""
    store = RunStore(out / "runs.jsonl", [out.parent / name / "runs.jsonl" for name in exp.reuse])
    summary: list[dict[str, Any]] = []
    for setting in exp.settings:
        for method in exp.methods:
            base = dataclasses.replace(setting.base, gsgd_kwargs=kw(**exp.gsgd_kwargs), **exp.overrides.get(method, {}))
            grid = grid_for(method, base, exp.grid_points)
            choice = tune(base, method, grid, exp.schedules, exp.tune_seeds, store, runner)
            for s in exp.spreads:
                runs = evaluate_seeds(base, choice, exp.final_seeds, store, runner, rescale_spread=s)
                summary.append(summarize(choice, runs, {**setting.label, "rescale_spread": s}))
            write_tables(out, store, summary)
    return summary


def estimate(exp: Experiment, methods: Sequence[str] = ALL_METHODS, epochs: int = 2) -> dict[str, Any]:
    """Time one short run per setting and method; extrapolate to the experiment's planned runs.

    Per run: ``epochs x (fit seconds per epoch) + (seconds outside the fit: set-up, test)``. Methods
    not timed are costed like the slowest timed one. Grid extensions and diverged runs (which stop
    early) are not modelled.
    """
    rows, total = [], 0.0
    for setting in exp.settings:
        per_run: dict[str, float] = {}
        per_epoch: dict[str, float] = {}
        for m in methods:
            if m not in exp.methods:
                continue
            cfg = dataclasses.replace(
                setting.base,
                method=m,
                lr=1e-9,
                epochs=epochs,
                gsgd_kwargs=kw(**exp.gsgd_kwargs),
                **exp.overrides.get(m, {}),
            )
            r = run_one(cfg, accelerator="cpu")
            per_epoch[m] = r["fit_s"] / epochs
            per_run[m] = per_epoch[m] * setting.base.epochs + (r["wall_s"] - r["fit_s"])
        slowest = max(per_run.values())
        secs = sum(per_run.get(m, slowest) for m in exp.methods) * exp.runs_per_method()
        total += secs
        rows.append({**setting.label, "epochs": setting.base.epochs, "s_per_epoch": per_epoch, "budget_h": secs / 3600})
    return {
        "experiment": exp.name,
        "runs": exp.runs_planned(),
        "threads": torch.get_num_threads(),
        "settings": rows,
        "total_h": total / 3600,
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=sorted(experiments()))
    p.add_argument("--out", type=Path, default=Path("results/study"), help="output folder (a subfolder per experiment)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--epochs", type=int, default=None, help="override every setting's epochs (for trials)")
    p.add_argument("--epoch-scale", type=float, default=1.0, help="multiply every setting's default epochs")
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="keep the settings whose label KEY is one of the values (repeatable), e.g. width=32,128,512",
    )
    p.add_argument("--methods", type=lambda v: v.split(","), default=None, help="comma-separated subset of methods")
    p.add_argument("--spreads", type=lambda v: [float(x) for x in v.split(",")], default=None, help="e.g. 0,1,2,3")
    p.add_argument("--grid-points", type=int, default=None, help=f"lr grid points per method (default {GRID_POINTS})")
    p.add_argument(
        "--schedules",
        type=lambda v: v.split(","),
        default=None,
        help=f"comma-separated schedules tuned with the lr (default {','.join(SCHEDULES)})",
    )
    p.add_argument("--estimate", action="store_true", help="time one short run per setting and print the budget")
    p.add_argument("--plan", action="store_true", help="print settings, grids and run counts; run nothing")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    only: dict[str, list[str]] = {}
    for item in args.only:
        key, sep, values = item.partition("=")
        if not sep or not values:
            p.error(f"--only {item!r}: expected KEY=V1,V2")
        only[key] = values.split(",")
    exp = reduce(
        experiments(args.epochs, args.epoch_scale)[args.experiment],
        only=only,
        methods=args.methods,
        spreads=args.spreads,
        grid_points=args.grid_points,
        schedules=args.schedules,
    )
    if args.plan:
        for s in exp.settings:
            grids = {m: grid_for(m, s.base, exp.grid_points) for m in exp.methods}
            print(json.dumps({"setting": s.label, "epochs": s.base.epochs, "grids": grids}))
        print(
            json.dumps(
                {
                    "methods": exp.methods,
                    "schedules": exp.schedules,
                    "spreads": exp.spreads,
                    "runs_planned": exp.runs_planned(),
                }
            )
        )
        return
    if args.estimate:
        print(json.dumps(estimate(exp), indent=1))
        return
    t0 = time.perf_counter()
    summary = run_experiment(exp, args.out / exp.name)
    for row in summary:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) and math.isfinite(v) else v for k, v in row.items()}))
    print(f"done in {time.perf_counter() - t0:.0f} s; tables in {args.out / exp.name}")


if __name__ == "__main__":
    main()
