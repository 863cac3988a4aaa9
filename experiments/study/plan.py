"""What an experiment of the study is: its settings, methods, grids and seeds (no running here).

``experiments.study.experiments`` defines the MNIST-1D experiments and runs them;
``experiments.study.plans_mnist`` defines the real-MNIST and BatchNorm experiments of issue 19.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from experiments.study.harness import RunConfig, kw

ALL_METHODS = ("sgd", "sgd+skeleton", "gsgd", "path-sgd")
GRID_POINTS = 7
SGD_CENTRE = 10**-1.5  # grid 1e-3 .. 1 (7 points) for the SGD-like methods
ADAM_CENTRE = 10**-2.5  # grid 1e-4 .. 0.1 (7 points) for Adam, AdamW and their G-space versions
ADAM_FAMILY = ("adam", "gadam", "adamw", "gadamw", "adam+skeleton", "adamw+skeleton")
TUNE_SEEDS = (0,)
FINAL_SEEDS = (1, 2, 3, 4, 5)
# tuned with the lr: constant, or cosine annealing to 0 over the run (per step)
SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class Setting:
    """One model/dataset configuration of an experiment; ``label`` names it in the tables."""

    label: dict[str, Any]
    base: RunConfig


@dataclass(frozen=True)
class Experiment:
    """An experiment: settings x methods, tuned at spread 0, evaluated at every spread."""

    name: str
    description: str
    settings: tuple[Setting, ...]
    methods: tuple[str, ...] = ALL_METHODS
    schedules: tuple[str, ...] = SCHEDULES
    spreads: tuple[float, ...] = (0.0,)
    tune_seeds: tuple[int, ...] = TUNE_SEEDS
    final_seeds: tuple[int, ...] = FINAL_SEEDS
    gsgd_kwargs: dict[str, Any] = field(default_factory=dict)
    grid_points: int = GRID_POINTS
    # per method, RunConfig fields that differ from the setting's (e.g. AdamW's weight decay)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    # sibling experiments (same --out) whose stored runs are reused when a config is identical
    reuse: tuple[str, ...] = ()

    def runs_per_method(self) -> int:
        """Runs per setting and method, without grid extensions."""
        return self.grid_points * len(self.schedules) * len(self.tune_seeds) + len(self.spreads) * len(self.final_seeds)

    def runs_planned(self) -> int:
        """Runs of the whole experiment, without grid extensions."""
        return len(self.settings) * len(self.methods) * self.runs_per_method()


def base_config(model: str, epochs: int, dataset: str = "mnist1d", **model_kwargs: Any) -> RunConfig:
    """The setting's run config before a method and lr are chosen."""
    cfg = RunConfig(method="sgd", lr=0.0, model=model, model_kwargs=kw(**model_kwargs), epochs=epochs)
    return cfg if dataset == "mnist1d" else dataclasses.replace(cfg, dataset=dataset)
