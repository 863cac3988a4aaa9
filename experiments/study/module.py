"""The study's LightningModule: cross-entropy classification with one of the study's methods."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from experiments.study.methods import Method, build_optimizer
from lightning_gsgd import Topology

SCHEDULES = ("constant", "cosine")


class StudyModule(L.LightningModule):
    """Wraps a classifier; records one history row per epoch (train loss, validation loss/accuracy, lr).

    A non-finite training loss stops the fit and marks the run as diverged.

    Args:
        model: The classifier (logits out).
        method: The study method (decides the optimizer).
        lr: Learning rate (peak lr for the cosine schedule).
        momentum: Momentum.
        weight_decay: Weight decay (what it means depends on the method).
        schedule: ``"constant"`` or ``"cosine"`` (cosine annealing to 0 over ``total_steps``, per step).
        total_steps: Optimizer steps of the whole fit (for the schedule).
        topology: The model's topology (required for ``path-sgd``).
    """

    def __init__(
        self,
        model: nn.Module,
        method: Method,
        lr: float,
        momentum: float,
        weight_decay: float,
        schedule: str,
        total_steps: int,
        topology: Topology | None = None,
    ) -> None:
        super().__init__()
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
        self.model = model
        self.method = method
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.schedule = schedule
        self.total_steps = max(1, total_steps)
        self.topology = topology
        self.history: list[dict[str, float]] = []
        self.diverged = False
        self._train_sum: Tensor | None = None
        self._train_n = 0
        self._eval: dict[str, float] = {}
        self.test_metrics: dict[str, float] = {}

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if not bool(torch.isfinite(loss)):
            self.diverged = True
            self.trainer.should_stop = True
        d = loss.detach() * len(y)
        self._train_sum = d if self._train_sum is None else self._train_sum + d
        self._train_n += len(y)
        return loss

    def _eval_step(self, batch: tuple[Tensor, Tensor]) -> None:
        x, y = batch
        logits = self(x)
        e = self._eval
        e["loss"] = e.get("loss", 0.0) + float(F.cross_entropy(logits, y, reduction="sum"))
        e["correct"] = e.get("correct", 0.0) + float((logits.argmax(1) == y).sum())
        e["n"] = e.get("n", 0.0) + len(y)

    def _eval_result(self) -> dict[str, float]:
        e, self._eval = self._eval, {}
        n = max(e.get("n", 0.0), 1.0)
        return {"loss": e.get("loss", math.nan) / n, "acc": e.get("correct", math.nan) / n}

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        r = self._eval_result()
        if self.trainer.sanity_checking:
            return
        train = math.nan if self._train_sum is None else float(self._train_sum) / max(self._train_n, 1)
        self._train_sum, self._train_n = None, 0
        self.history.append(
            {
                "epoch": self.current_epoch,
                "step": self.global_step,
                "train_loss": train,
                "val_loss": r["loss"],
                "val_acc": r["acc"],
                "lr": float(self.trainer.optimizers[0].param_groups[0]["lr"]),
            }
        )
        self.log_dict({"val_loss": r["loss"], "val_acc": r["acc"]})

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        r = self._eval_result()
        self.test_metrics = {"test_loss": r["loss"], "test_acc": r["acc"]}
        self.log_dict(self.test_metrics)

    def configure_optimizers(self) -> Any:
        opt = build_optimizer(self.method, self.model, self.lr, self.momentum, self.weight_decay, self.topology)
        if self.schedule == "constant":
            return opt
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
