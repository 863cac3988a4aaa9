"""Issue 5: the ``gsgd/`` diagnostics reach the user's logger through GSGDCallback (and GSGDMixin).

Every fit here is tiny (a 4-6-5 | LayerNorm | 5-7-3 MLP, 8-sample batches, a few steps) and
writes a real ``CSVLogger`` log that the tests read back with the ``csv`` module.
"""

from __future__ import annotations

import copy
import csv
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn

from lightning_gsgd import GSGD, GSGDCallback, GSGDMixin, detect_topology, init_skeleton_
from lightning_gsgd.diagnostics.metrics import AFTER_KEYS, BEFORE_KEYS, PathDiagnostics
from tests.lightning_models import MLPModule, cpu_trainer, make_dataset, make_loader
from tests.models import two_chains

STEP_KEYS = tuple(f"gsgd/{k}" for k in BEFORE_KEYS + AFTER_KEYS)
SUMMARY_KEYS = tuple(
    f"gsgd/{k}"
    for k in (
        "chains",
        "hidden_units",
        "basis_paths",
        "coverage",
        "covered_params",
        "plain_params",
        "s1_units",
        "s2_rows",
    )
)


class TwoChainModule(MLPModule):
    """4-6-5 | LayerNorm(5) | 5-7-3: two ReLU chains and a LayerNorm left to plain SGD; logs its loss."""

    def __init__(self, lr: float = 0.05, momentum: float = 0.9) -> None:
        super().__init__(lr=lr, momentum=momentum)

    def build_net(self, hidden: int) -> nn.Module:
        return two_chains()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss)
        return loss


class MixinTwoChain(GSGDMixin, TwoChainModule):
    """The same module with G-SGD built in."""


class Recorder(Callback):
    """Counts calls of ``PathDiagnostics.before_step`` / ``after_step`` made by the callback."""

    def __init__(self) -> None:
        self.before = 0
        self.after = 0
        self.requests = 0

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        gsgd = next(cb for cb in trainer.callbacks if isinstance(cb, GSGDCallback))
        diag = gsgd.diagnostics.diagnostics
        if diag is None:
            return
        before, after = diag.before_step, diag.after_step

        def counted_before(optimizer: Any = None) -> dict[str, Tensor]:
            self.before += 1
            return before(optimizer)

        def counted_after(optimizer: Any = None) -> dict[str, Tensor]:
            self.after += 1
            return after(optimizer)

        diag.before_step, diag.after_step = counted_before, counted_after
        # the optimizer's by-products are requested on logging steps only, too
        request = gsgd.optimizer.request_readings

        def counted_request() -> bool:
            self.requests += 1
            return request()

        gsgd.optimizer.request_readings = counted_request


class BreakGradient(Callback):
    """Writes ``value`` into one gradient at optimizer step ``at`` and checks that step left the weights alone.

    ``hook="before_optimizer_step"`` (after AMP unscaling: GSGD sees the bad gradient);
    ``hook="after_backward"`` (before unscaling: AMP's GradScaler sees it and skips the step).
    """

    def __init__(self, at: int, value: float, hook: str = "before_optimizer_step") -> None:
        self.at, self.value, self.hook = at, value, hook
        self.snapshot: dict[str, Tensor] | None = None
        self.unchanged: bool | None = None

    def _break(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step == self.at:
            pl_module.net[0].weight.grad[0, 0] = self.value
            self.snapshot = {k: v.detach().clone() for k, v in pl_module.named_parameters()}

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.hook == "after_backward":
            self._break(trainer, pl_module)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if self.hook == "before_optimizer_step":
            self._break(trainer, pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if trainer.global_step == self.at + 1 and self.snapshot is not None:
            self.unchanged = all(torch.equal(v, self.snapshot[k]) for k, v in pl_module.named_parameters())


def read_log(path: Path) -> list[dict[str, float]]:
    """Rows of a CSVLogger ``metrics.csv``, each with only its non-empty cells, as floats."""
    with path.open(newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def column(rows: list[dict[str, float]], key: str) -> dict[int, float]:
    """``step -> value`` of one key; a key must not be written twice for the same step."""
    out: dict[int, float] = {}
    for row in rows:
        if key in row:
            step = int(row["step"])
            assert step not in out, f"{key} written twice at step {step}"
            out[step] = row[key]
    return out


def fit(
    tmp_path: Path, model: LightningModule, callbacks: list[Callback], steps: int, every: int, **trainer_kw: Any
) -> tuple[Trainer, list[dict[str, float]]]:
    logger = CSVLogger(tmp_path, name="run")
    trainer = cpu_trainer(max_steps=steps, logger=logger, log_every_n_steps=every, callbacks=callbacks, **trainer_kw)
    trainer.fit(model, make_loader(make_dataset(), 8))
    return trainer, read_log(Path(logger.log_dir) / "metrics.csv")


def _summary_numbers(text: str) -> dict[str, float]:
    """The numbers in the first line of ``Topology.summary()``."""
    m = re.search(
        r"(\d+) chain\(s\), (\d+) hidden units, (\d+) basis paths, coverage ([\d.]+)% \((\d+) of (\d+) parameters\)",
        text,
    )
    assert m is not None, text
    chains, hidden, paths, pct, covered, total = m.groups()
    return {
        "chains": int(chains),
        "hidden_units": int(hidden),
        "basis_paths": int(paths),
        "coverage_pct": float(pct),
        "covered_params": int(covered),
        "plain_params": int(total) - int(covered),
    }


def test_csv_log_has_every_key_with_the_values_of_a_run_by_hand(tmp_path):
    torch.manual_seed(0)
    model = TwoChainModule()
    ref = copy.deepcopy(model)
    _, rows = fit(tmp_path, model, [GSGDCallback()], steps=6, every=2)

    # fit-start numbers: once, at step 0, equal to what detect_topology(...).summary() reports
    topo = detect_topology(ref, ref.example_input_array)
    reported = _summary_numbers(topo.summary())
    assert reported == {  # and to an independent count of this model
        "chains": 2,
        "hidden_units": 6 + 7,
        "basis_paths": (4 * 6 + 6 * 5 + 6) + (5 * 7 + 7 * 3 + 7) - (6 + 7),
        "coverage_pct": pytest.approx(100 * 131 / 141, abs=0.05),
        "covered_params": (4 * 6 + 6 + 6 * 5 + 5) + (5 * 7 + 7 + 7 * 3 + 3),
        "plain_params": 10,
    }
    logged = {k: column(rows, k) for k in SUMMARY_KEYS}
    assert all(set(v) == {0} for v in logged.values()), logged
    for name in ("chains", "hidden_units", "basis_paths", "covered_params", "plain_params"):
        assert logged[f"gsgd/{name}"][0] == reported[name], name
    assert 100 * logged["gsgd/coverage"][0] == pytest.approx(reported["coverage_pct"], abs=0.05)
    assert logged["gsgd/coverage"][0] == topo.coverage

    # step keys: exactly on the steps Lightning writes its own step metrics, all finite
    loss_steps = set(column(rows, "train_loss"))
    assert loss_steps == {1, 3, 5}
    for key in STEP_KEYS:
        col = column(rows, key)
        assert set(col) == loss_steps, key
        assert all(math.isfinite(v) for v in col.values()), key

    # the values: PathDiagnostics around the same G-SGD steps taken by hand
    init_skeleton_(topo)
    opt = GSGD(ref.parameters(), lr=0.05, momentum=0.9, topology=topo)
    diag = PathDiagnostics(topo)
    batches = list(make_loader(make_dataset(), 8)) * 2
    for step, (x, y) in enumerate(batches[:6]):
        opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        if step in loss_steps:
            want = {f"gsgd/{k}": float(v) for k, v in diag.before_step().items()}
        opt.step()
        if step in loss_steps:
            want |= {f"gsgd/{k}": float(v) for k, v in diag.after_step(opt).items()}
            assert set(want) == set(STEP_KEYS)
            for key, value in want.items():
                assert column(rows, key)[step] == pytest.approx(value, rel=1e-6, abs=0), (step, key)
    steps = column(rows, "gsgd/steps")
    assert steps == {s: s + 1.0 for s in loss_steps}  # logged after the step: steps taken so far
    assert column(rows, "gsgd/relative_update")[1] > 0
    assert set(column(rows, "gsgd/guard_hits").values()) == {0.0}
    assert set(column(rows, "gsgd/skipped_steps").values()) == {0.0}


def test_no_work_on_steps_that_do_not_log(tmp_path):
    rec = Recorder()
    _, rows = fit(tmp_path / "a", TwoChainModule(), [GSGDCallback(), rec], steps=7, every=3)
    assert set(column(rows, "gsgd/path_grad_norm")) == set(column(rows, "train_loss")) == {2, 5}
    assert (rec.before, rec.after, rec.requests) == (2, 2, 2)

    # gradient accumulation: one measurement per optimizer step that logs, not per micro-batch
    rec = Recorder()
    _, rows = fit(tmp_path / "b", TwoChainModule(), [GSGDCallback(), rec], steps=4, every=2, accumulate_grad_batches=2)
    assert set(column(rows, "gsgd/relative_update")) == set(column(rows, "train_loss")) == {1, 3}
    assert (rec.before, rec.after) == (2, 2)
    assert column(rows, "gsgd/steps") == {1: 2.0, 3: 4.0}


def test_nothing_runs_without_a_logger_or_with_diagnostics_off(tmp_path):
    for callback, logger in ((GSGDCallback(), False), (GSGDCallback(diagnostics=False), CSVLogger(tmp_path))):
        trainer = cpu_trainer(max_steps=3, log_every_n_steps=1, logger=logger, callbacks=[callback])
        trainer.fit(TwoChainModule(), make_loader(make_dataset(), 8))
        assert callback.diagnostics.diagnostics is None
        assert not any(k.startswith("gsgd/") for k in trainer.callback_metrics)
    rows = read_log(Path(trainer.logger.log_dir) / "metrics.csv")
    assert set(column(rows, "gsgd/chains")) == {0}  # the fit-start numbers are logged either way
    assert not column(rows, "gsgd/path_grad_norm")


def test_huge_learning_rate_hits_the_guard(tmp_path):
    _, rows = fit(tmp_path, TwoChainModule(lr=1e3, momentum=0.0), [GSGDCallback()], steps=3, every=1)
    hits = column(rows, "gsgd/guard_hits")
    assert hits[2] > 0
    assert list(hits.values()) == sorted(hits.values())  # cumulative


def test_nan_gradient_is_a_skipped_step_and_leaves_the_weights_alone(tmp_path):
    breaker = BreakGradient(at=2, value=float("nan"))
    _, rows = fit(tmp_path, TwoChainModule(), [breaker, GSGDCallback()], steps=5, every=1)
    assert breaker.unchanged is True
    assert column(rows, "gsgd/skipped_steps") == {0: 0.0, 1: 0.0, 2: 1.0, 3: 1.0, 4: 1.0}
    assert column(rows, "gsgd/steps") == {0: 1.0, 1: 2.0, 2: 2.0, 3: 3.0, 4: 4.0}
    assert column(rows, "gsgd/relative_update")[2] == 0.0
    assert math.isnan(column(rows, "gsgd/path_grad_norm")[2])  # what the step saw
    assert math.isfinite(column(rows, "gsgd/path_grad_norm")[3])


def test_steps_that_amp_grad_scaler_skips_are_not_counted(tmp_path):
    from lightning.pytorch.plugins import MixedPrecision

    # the real 16-mixed path with a CPU GradScaler; an inf before unscaling makes the scaler skip the step
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=1000)
    breaker = BreakGradient(at=1, value=float("inf"), hook="after_backward")
    _, rows = fit(
        tmp_path,
        TwoChainModule(),
        [breaker, GSGDCallback()],
        steps=4,
        every=1,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler)],
    )
    assert breaker.unchanged is True
    assert column(rows, "gsgd/steps") == {0: 1.0, 1: 1.0, 2: 2.0, 3: 3.0}
    assert set(column(rows, "gsgd/skipped_steps").values()) == {0.0}  # G-SGD never saw that step
    assert column(rows, "gsgd/relative_update")[1] == 0.0
    assert column(rows, "gsgd/relative_update")[2] > 0


def test_per_chain_keys_and_invariance_check(tmp_path):
    torch.manual_seed(3)
    model = TwoChainModule()
    plain = copy.deepcopy(model)
    _, rows = fit(tmp_path / "a", model, [GSGDCallback(per_chain=True, invariance_check=True)], steps=4, every=2)
    for i in (0, 1):
        for k in BEFORE_KEYS + ("relative_update",):
            col = column(rows, f"gsgd/chain{i}/{k}")
            assert set(col) == {1, 3} and all(math.isfinite(v) for v in col.values()), (i, k)
    residual = column(rows, "gsgd/invariance_residual")
    assert set(residual) == {1, 3}
    assert all(0 <= r < 1e-5 for r in residual.values())
    # the check rescales the live weights and restores them bit for bit: training is unchanged
    fit(tmp_path / "b", plain, [GSGDCallback()], steps=4, every=2)
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p, q), name


def test_mixin_logs_the_same_keys(tmp_path):
    _, rows = fit(tmp_path, MixinTwoChain(), [], steps=2, every=1)
    for key in SUMMARY_KEYS + STEP_KEYS:
        assert column(rows, key), key


def test_model_without_chains_logs_only_the_fit_start_numbers(tmp_path):
    class TanhNet(TwoChainModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))

    with pytest.warns(UserWarning, match="no ReLU chain"):
        _, rows = fit(tmp_path, TanhNet(), [GSGDCallback(allow_empty=True)], steps=2, every=1)
    assert column(rows, "gsgd/chains") == {0: 0.0}
    assert column(rows, "gsgd/coverage") == {0: 0.0}
    assert not column(rows, "gsgd/path_grad_norm")


def test_plot_of_real_logs(tmp_path):
    from lightning_gsgd.diagnostics.plot import plot_metrics

    pytest.importorskip("matplotlib")
    runs = []
    for name, lr in (("a", 0.05), ("b", 0.3)):
        torch.manual_seed(0)
        breaker = BreakGradient(at=12, value=float("nan"))
        trainer, _ = fit(tmp_path / name, TwoChainModule(lr=lr), [breaker, GSGDCallback()], steps=24, every=2)
        runs.append(Path(trainer.logger.log_dir) / "metrics.csv")
    out = tmp_path / "gsgd.png"
    report = plot_metrics(runs[0], out, compare=runs[1], labels=("lr 0.05", "lr 0.3"))
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 50_000  # a grid of drawn panels, not an empty canvas
    assert not report.notes  # both runs logged every key the plot draws
    for title in ("train_loss", "skeleton paths |v|: min / median / max", "skipped steps (cumulative)"):
        assert title in report.panels, report.panels


def test_resumed_fit_logs_the_fit_start_numbers_at_its_step_and_counters_go_on(tmp_path):
    torch.manual_seed(0)
    first, _ = fit(tmp_path / "a", TwoChainModule(), [GSGDCallback()], steps=4, every=1)  # one epoch
    path = tmp_path / "four.ckpt"
    first.save_checkpoint(path)
    logger = CSVLogger(tmp_path / "b", name="run")
    trainer = cpu_trainer(max_steps=6, logger=logger, log_every_n_steps=1, callbacks=[GSGDCallback()])
    trainer.fit(TwoChainModule(), make_loader(make_dataset(), 8), ckpt_path=path)
    rows = read_log(Path(logger.log_dir) / "metrics.csv")
    assert set(column(rows, "gsgd/chains")) == {4}
    assert column(rows, "gsgd/steps") == {4: 5.0, 5: 6.0}  # GSGD's counters come back with its state
