"""The tuning protocol and the result files.

For every setting (a model and dataset) and every method:

1. **Tune** on the validation split: one run per point of the method's lr grid (times each schedule)
   with the tuning seed(s). Every method gets the same number of grid points. If the best point
   is at an edge of the grid, the grid is extended past that edge one point at a time (at most
   ``max_extend`` points), so that no method is judged at the border of its range; the extra runs
   are counted and reported (``grid_runs``, ``at_edge``).
2. **Choose** the point with the best mean final validation accuracy over the tuning seeds (ties:
   lower validation loss); diverged runs rank last.
3. **Evaluate** the chosen setting with the final seeds (distinct from the tuning seeds) and report
   test loss and accuracy as mean +- sample standard deviation (ddof = 1).

Every finished run is appended to ``runs.jsonl`` in the output folder, so an interrupted experiment
resumes where it stopped; ``write_tables`` turns the store into CSV and JSON files.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments.study.harness import RunConfig

Runner = Callable[[RunConfig], dict[str, Any]]


def _read_jsonl(path: Path | None) -> dict[str, dict[str, Any]]:
    runs: dict[str, dict[str, Any]] = {}
    if path is not None and path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                runs[r["id"]] = r
    return runs


_INTS = ("seed", "steps", "guard_hits", "skipped_steps", "threads")


def _read_csv_store(folder: Path) -> dict[str, dict[str, Any]]:
    """The runs of ``runs.csv`` and ``curves.csv`` in ``folder`` (the committed tables), as store entries.

    ``runs.jsonl`` is not committed for the MNIST-1D experiments; the CSV files hold every run's id,
    results and curve (curves to 6 significant digits), which is all tuning, evaluation and the
    tables read, so a fresh clone resumes from them. The config keeps only the CSV's columns.
    """
    runs_csv, curves_csv = folder / "runs.csv", folder / "curves.csv"
    if not runs_csv.exists():
        return {}
    history: dict[str, list[dict[str, Any]]] = {}
    if curves_csv.exists():
        with curves_csv.open() as f:
            for row in csv.DictReader(f):
                h = {k: _parse(k, row[k]) for k in row if k not in ("id", "method", "seed")}
                history.setdefault(row["id"], []).append(h)
    runs = {}
    with runs_csv.open() as f:
        for row in csv.DictReader(f):
            r = {k: _parse(k, v) for k, v in row.items() if v != ""}
            r["model_kwargs"] = json.loads(row["model_kwargs"])
            cfg_keys = ("method", "lr", "schedule", "seed", "model", "model_kwargs", "rescale_spread")
            r["config"] = {k: r.pop(k) for k in cfg_keys if k in r}
            r["history"] = sorted(history.get(row["id"], []), key=lambda h: h["epoch"])
            runs[row["id"]] = r
    return runs


def _parse(key: str, v: str) -> Any:
    if key in ("id", "phase", "method", "schedule", "model", "model_kwargs", "optimizer"):
        return v
    if v in ("True", "False"):
        return v == "True"
    return int(v) if key in _INTS or key == "epoch" or key == "step" else float(v)


class RunStore:
    """Finished runs, kept in memory and appended to a JSON-lines file (one run per line).

    The store starts from the committed tables next to the file (``runs.csv``, ``curves.csv``) when
    they exist, then from the file itself (exact values, newer runs).

    Args:
        path: The store's file (``None``: memory only).
        reuse: Other experiments' stores, read only: a run found there (same config, so the same
            result) is copied into this store instead of being trained again.
    """

    def __init__(self, path: Path | None, reuse: Sequence[Path] = ()) -> None:
        self.path = path
        self.runs = {} if path is None else _read_csv_store(path.parent)
        self.runs.update(_read_jsonl(path))
        self.cache: dict[str, dict[str, Any]] = {}
        for other in reuse:
            self.cache.update(_read_csv_store(other.parent))
            self.cache.update(_read_jsonl(other))

    def get_or_run(self, cfg: RunConfig, runner: Runner, tag: dict[str, Any]) -> dict[str, Any]:
        """The stored result of ``cfg``, or the reused one, or run it; tag it and store it."""
        rid = cfg.run_id()
        if rid not in self.runs:
            r = dict(self.cache[rid]) if rid in self.cache else dict(runner(cfg))
            r.update(tag)
            self.runs[rid] = r
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a") as f:
                    f.write(json.dumps(r, default=_json_default) + "\n")
        return self.runs[rid]


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _round6(x: Any) -> Any:
    return float(f"{x:.6g}") if isinstance(x, float) else x


def _round3(x: float) -> float:
    return float(f"{x:.3g}")


def lr_grid(centre: float, points: int, factor: float = math.sqrt(10.0)) -> list[float]:
    """``points`` learning rates spaced by ``factor`` around ``centre`` (geometric, 3 significant digits)."""
    lo = -(points - 1) / 2
    return [_round3(centre * factor ** (lo + i)) for i in range(points)]


def score(runs: Sequence[dict[str, Any]]) -> tuple[float, float]:
    """Sort key of a grid point (higher is better): mean val accuracy, then minus mean val loss."""
    if any(r["diverged"] or not math.isfinite(r["val_acc"]) for r in runs):
        return (-math.inf, -math.inf)
    acc = statistics.fmean(r["val_acc"] for r in runs)
    loss = statistics.fmean(r["val_loss"] for r in runs)
    return (acc, -loss if math.isfinite(loss) else -math.inf)


@dataclass(frozen=True)
class Choice:
    """The setting chosen for one method, with the tuning bookkeeping."""

    method: str
    lr: float
    schedule: str
    val_acc: float
    grid_runs: int
    at_edge: bool


def tune(
    base: RunConfig,
    method: str,
    grid: Sequence[float],
    schedules: Sequence[str],
    seeds: Sequence[int],
    store: RunStore,
    runner: Runner,
    max_extend: int = 3,
    factor: float = math.sqrt(10.0),
) -> Choice:
    """Grid-search the lr (and schedule) of ``method`` on the validation split; see the module docstring."""
    lrs = sorted(grid)
    results: dict[tuple[float, str], list[dict[str, Any]]] = {}

    def evaluate(lr: float) -> None:
        for schedule in schedules:
            if (lr, schedule) in results:
                continue
            runs = []
            for seed in seeds:
                cfg = dataclasses.replace(base, method=method, lr=lr, schedule=schedule, seed=seed)
                runs.append(store.get_or_run(cfg, runner, {"phase": "tune"}))
            results[(lr, schedule)] = runs

    for lr in lrs:
        evaluate(lr)
    lo, hi = lrs[0], lrs[-1]
    below = above = 0  # points added past each edge (computed from the edge, so rounding does not drift)
    for _ in range(max_extend):
        best_lr = max(results, key=lambda k: score(results[k]))[0]
        if best_lr == lrs[0]:
            below += 1
            lrs.insert(0, _round3(lo / factor**below))
            evaluate(lrs[0])
        elif best_lr == lrs[-1]:
            above += 1
            lrs.append(_round3(hi * factor**above))
            evaluate(lrs[-1])
        else:
            break
    (lr, schedule), runs = max(results.items(), key=lambda kv: score(kv[1]))
    return Choice(
        method,
        lr,
        schedule,
        score(runs)[0],
        grid_runs=sum(len(v) for v in results.values()),
        at_edge=lr in (lrs[0], lrs[-1]),
    )


def evaluate_seeds(
    base: RunConfig, choice: Choice, seeds: Iterable[int], store: RunStore, runner: Runner, **overrides: Any
) -> list[dict[str, Any]]:
    """Runs of the chosen setting with every final seed (``overrides`` change other config fields)."""
    out = []
    for seed in seeds:
        cfg = dataclasses.replace(
            base, method=choice.method, lr=choice.lr, schedule=choice.schedule, seed=seed, **overrides
        )
        out.append(store.get_or_run(cfg, runner, {"phase": "final"}))
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``nan`` std for a single value; both ``nan`` when a value
    is not finite, e.g. the test loss of a diverged run)."""
    vals = list(values)
    if not vals or not all(math.isfinite(v) for v in vals):
        return math.nan, math.nan
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else math.nan


def summarize(choice: Choice, runs: Sequence[dict[str, Any]], setting: dict[str, Any]) -> dict[str, Any]:
    """One summary row: the setting, the choice, and test metrics as mean +- std over the seeds."""
    acc_m, acc_s = mean_std([r["test_acc"] for r in runs])
    loss_m, loss_s = mean_std([r["test_loss"] for r in runs])
    return {
        **setting,
        "method": choice.method,
        "lr": choice.lr,
        "schedule": choice.schedule,
        "tune_val_acc": choice.val_acc,
        "grid_runs": choice.grid_runs,
        "lr_at_grid_edge": choice.at_edge,
        "seeds": len(runs),
        "diverged": sum(bool(r["diverged"]) for r in runs),
        "test_acc_mean": acc_m,
        "test_acc_std": acc_s,
        "test_err_mean": 1.0 - acc_m,
        "test_loss_mean": loss_m,
        "test_loss_std": loss_s,
        "fit_s_mean": statistics.fmean(r["fit_s"] for r in runs) if runs else math.nan,
    }


RUN_COLUMNS = ["id", "phase", "method", "lr", "schedule", "seed", "model", "model_kwargs", "rescale_spread"]
RUN_COLUMNS += ["val_loss", "val_acc", "test_loss", "test_acc", "diverged", "optimizer", "steps", "guard_hits"]
RUN_COLUMNS += ["skipped_steps", "fit_s", "wall_s", "threads", "loadavg"]


def write_tables(out: Path, store: RunStore, summary: Sequence[dict[str, Any]]) -> None:
    """Write ``runs.csv`` (one row per run), ``curves.csv`` (one row per run and epoch),
    ``summary.csv`` and ``summary.json`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    rows, curves = [], []
    for r in store.runs.values():
        c = r["config"]
        flat = {**c, **{k: v for k, v in r.items() if k not in ("config", "history")}}
        flat["model_kwargs"] = json.dumps(c["model_kwargs"], sort_keys=True)
        rows.append({k: flat.get(k) for k in RUN_COLUMNS})
        for h in r["history"]:
            h = {k: _round6(v) for k, v in h.items()}  # 6 significant digits keep the file small
            curves.append({"id": r["id"], "method": c["method"], "seed": c["seed"], "lr": c["lr"], **h})
    _write_csv(out / "runs.csv", rows)
    _write_csv(out / "curves.csv", curves)
    _write_csv(out / "summary.csv", list(summary))
    (out / "summary.json").write_text(json.dumps(list(summary), indent=1, default=_json_default) + "\n")


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
