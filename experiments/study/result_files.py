"""The study's result files (``summary.json``, ``runs.csv``, ``curves.csv`` under
``<results>/<experiment>/``), read for the report and the figures."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

METHOD_ORDER = ("gsgd", "sgd", "sgd+skeleton", "path-sgd")


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


def final_test_acc(runs: dict[str, dict[str, str]], model: str) -> dict[str, list[float]]:
    """Final-seed test accuracies per method for one model (spread 0)."""
    out: dict[str, list[float]] = defaultdict(list)
    for r in runs.values():
        if r["phase"] == "final" and r["model"] == model and float(r["rescale_spread"]) == 0.0:
            out[r["method"]].append(_num(r["test_acc"]))
    return out
