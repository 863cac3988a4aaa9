"""Misuse that used to go wrong without a word: out-of-range arguments, silently skipped steps, counters.

Each case is built as a user would hit it, and the test checks what the user reads.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_gsgd import GSGD, GAdam, GSGDCallback, PathSGD, TopologyError, detect_topology
from lightning_gsgd.lightning.skip_monitor import SkipMonitor
from lightning_gsgd.step.graph import ChainGraphs
from tests.lightning_models import MLPModule, cpu_trainer, make_dataset, make_loader
from tests.models import make
from tests.test_guard_collapse import _model as collapse_model


def _model():
    model, x = make("mlp_unequal")
    return model, detect_topology(model, x)


@pytest.mark.parametrize("cls", [GSGD, PathSGD])
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(momentum=2.0), r"momentum=2\.0; it must be in \[0, 1\)"),
        (dict(momentum=1.0), r"momentum=1\.0; it must be in \[0, 1\)"),
        (dict(momentum=-0.1), r"momentum=-0\.1; it must be in \[0, 1\)"),
        (dict(dampening=1.5), r"dampening=1\.5; it must be in \[0, 1\]"),
        (dict(lr=-1.0), r"lr=-1\.0; it must be >= 0"),
        (dict(lr=float("nan")), r"lr=nan; it must be >= 0"),
        (dict(weight_decay=-1e-3), r"weight_decay=-0\.001; it must be >= 0"),
        (dict(weight_decay=float("inf")), r"weight_decay=inf; it must be finite"),
    ],
)
def test_each_out_of_range_argument_is_refused_with_its_name_and_range(cls, kwargs, match):
    model, topo = _model()
    with pytest.raises(ValueError, match=match):
        cls(model.parameters(), **{"lr": 0.1, **kwargs}, topology=topo)


@pytest.mark.parametrize("cls", [GSGD, GAdam])
def test_counters_are_plain_python_numbers(cls):
    model, topo = _model()
    opt = cls(model.parameters(), lr=0.1, topology=topo)
    assert (opt.steps, opt.skipped_steps, opt.guard_hits, opt.collapsed_steps) == (0, 0, 0, 0)
    model(torch.randn(4, 5, dtype=torch.float64)).sum().backward()
    opt.step()
    assert type(opt.steps) is int and opt.steps == 1 and repr(opt.steps) == "1"
    assert type(opt.skipped_steps) is int and type(opt.guard_hits) is int and type(opt.collapsed_steps) is int
    counters = opt.counters()  # the tensors, for logging without a host read
    assert set(counters) == {"steps", "skipped_steps", "guard_hits", "collapsed_steps"}
    assert all(isinstance(t, Tensor) and t.dim() == 0 for t in counters.values())
    assert int(counters["steps"]) == 1


class _FakeOptimizer:
    """Counters as a GSGD has them, set by the test."""

    def __init__(self) -> None:
        self.steps = self.skipped = self.collapsed = 0
        self.guard_hits = 7

    def counters(self) -> dict[str, Tensor]:
        return {
            "steps": torch.tensor(self.steps),
            "skipped_steps": torch.tensor(self.skipped),
            "collapsed_steps": torch.tensor(self.collapsed),
            "guard_hits": torch.tensor(self.guard_hits),
        }


def _messages(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if "GSGD skipped" in str(w.message)]


@pytest.mark.parametrize(
    "collapse,expect",
    [(False, r"a gradient or a per-unit sum .* was not finite"), (True, r"collapsed \(the guard clamped 7 path")],
)
def test_the_first_skip_says_why(collapse, expect):
    opt, monitor = _FakeOptimizer(), SkipMonitor(fraction=0.1, window=50)
    monitor.start(opt)
    opt.steps = 3
    monitor.check(opt, wait=True)
    opt.skipped, opt.collapsed = 1, int(collapse)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        monitor.check(opt, wait=True)
        monitor.check(opt, wait=True)  # nothing new: no second warning
    (message,) = _messages(record)
    assert re.search(expect, message)


def test_a_run_that_keeps_skipping_warns_again_with_the_count_once_per_window():
    opt, monitor = _FakeOptimizer(), SkipMonitor(fraction=0.5, window=4)
    monitor.start(opt)
    got = []
    for step in range(1, 13):  # every step skipped
        opt.skipped = step
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            monitor.check(opt, wait=True)
        got += [(step, m) for m in _messages(record)]
    assert [s for s, _ in got] == [1, 5, 9]
    assert "skipped a step" in got[0][1]
    assert all("skipped 4 of the last 4 steps" in m for _, m in got[1:])


class _NaNLossAt(Callback):
    """Makes the loss NaN at the given optimizer steps (the gradients follow)."""

    def __init__(self, steps: set[int] | None) -> None:
        self.steps = steps  # None: every step

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        bad = self.steps is None or trainer.global_step in self.steps
        pl_module.loss_scale = float("nan") if bad else 1.0


class _ScaledLoss(MLPModule):
    loss_scale = 1.0

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return super().training_step(batch, batch_idx) * self.loss_scale


def _fit_warnings(nan_at: set[int] | None, epochs: int, **callback: Any) -> list[str]:
    torch.manual_seed(0)
    trainer = cpu_trainer(max_epochs=epochs, callbacks=[_NaNLossAt(nan_at), GSGDCallback(**callback)])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(_ScaledLoss(), make_loader(make_dataset(), 8))  # 4 steps an epoch
    return _messages(record)


def test_a_fit_whose_steps_are_all_skipped_warns_once_with_the_reason_then_with_the_count():
    got = _fit_warnings(None, epochs=3, skip_warning_window=5)  # 12 steps, all skipped
    assert len(got) == 3
    assert "skipped a step: a gradient or a per-unit sum" in got[0]
    assert "skipped 5 of the last 5 steps" in got[1] and "skipped 5 of the last 5 steps" in got[2]


def test_a_fit_with_one_nan_step_warns_once():
    got = _fit_warnings({2}, epochs=3, skip_warning_window=5)
    assert len(got) == 1 and "skipped a step" in got[0]


def test_the_skip_warning_can_be_switched_off():
    assert _fit_warnings(None, epochs=1, skip_warning_fraction=None) == []


def test_a_collapse_is_counted_apart_from_non_finite_gradients():
    model, topo = _model()
    opt = GSGD(model.parameters(), lr=0.1, topology=topo)
    x = torch.randn(4, 5, dtype=torch.float64)
    (model(x).sum() * float("nan")).backward()
    opt.step()
    assert (opt.skipped_steps, opt.collapsed_steps) == (1, 0)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_collapse_is_counted_as_a_collapse(digits, compiled):
    # the run of tests/test_guard_collapse.py: the guard drives path values down until the factors underflow
    x, y = digits
    model, topo = collapse_model(x)
    opt = GSGD(model.parameters(), lr=1.0, momentum=0.9, topology=topo, compiled=compiled)
    if compiled:
        opt._graphs = ChainGraphs(backend="eager", fullgraph=True)  # traced, not compiled by a C++ compiler
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        idx = torch.randint(0, len(x), (64,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    assert opt.skipped_steps > 0, "no step was skipped: the collapse was not reached"
    assert opt.collapsed_steps == opt.skipped_steps


def test_gsgd_refuses_the_state_of_gadam_and_gadam_that_of_gsgd():
    model, topo = _model()
    x = torch.randn(4, 5, dtype=torch.float64)
    saved = {}
    for cls in (GSGD, GAdam):
        opt = cls(model.parameters(), lr=1e-3, topology=topo, **({"momentum": 0.9} if cls is GSGD else {}))
        model(x).sum().backward()
        opt.step()
        saved[cls] = opt.state_dict()
    with pytest.raises(TopologyError, match="GSGD: this optimizer state was saved by GAdam/GAdamW"):
        GSGD(model.parameters(), lr=0.1, momentum=0.9, topology=topo).load_state_dict(saved[GAdam])
    with pytest.raises(TopologyError, match="GAdam: this optimizer state was saved by GSGD"):
        GAdam(model.parameters(), lr=0.1, topology=topo).load_state_dict(saved[GSGD])
