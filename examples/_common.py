"""The classifier plumbing shared by the examples: a LightningModule base, an MLP builder, quiet Trainer defaults.

What an example is about (its network, ``GSGDCallback`` or ``GSGDMixin``, the ``Trainer`` call) stays
in the example; what every example repeats lives here. The examples import this file as a sibling
module (``from _common import ...``), like ``_data.py``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from _data import Split
from torch import Tensor, nn

TRAINER_DEFAULTS: dict[str, Any] = {
    "deterministic": True,
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}
"""``Trainer`` arguments every example passes: deterministic, and nothing written or printed while it trains."""


def mlp(n_in: int, hidden: int, depth: int, n_out: int) -> nn.Sequential:
    """``depth`` blocks of ``Linear(., hidden)`` and ``ReLU``, then ``Linear(., n_out)``: one ReLU chain."""
    layers: list[nn.Module] = []
    width = n_in
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, n_out))


class Classifier(L.LightningModule):
    """Cross-entropy classifier around ``self.net``, trained with ``torch.optim.SGD``.

    A subclass builds ``self.net``, sets ``example_input_array`` (what G-SGD runs to find the ReLU
    chains) and saves ``lr`` and ``momentum`` with ``save_hyperparameters()``. Logs ``train_loss``
    and, in ``trainer.test``, ``test_acc``.
    """

    net: nn.Module

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def accuracy(self, batch: Any) -> Tensor:
        """Fraction of ``batch`` classified correctly."""
        x, y = batch
        return (self(x).argmax(dim=1) == y).float().mean()

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_acc", self.accuracy(batch))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)


def evaluate(trainer: L.Trainer, model: Classifier, data: Split) -> float:
    """Accuracy of the trained ``model`` on ``data``'s test set (one batch, so the logged mean is exact)."""
    (result,) = trainer.test(model, data.test_loader(), verbose=False)
    return float(result["test_acc"])
