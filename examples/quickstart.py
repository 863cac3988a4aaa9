"""Train an MLP on scikit-learn's bundled digits with G-SGD through a Lightning Trainer; print its test accuracy.

The model is an ordinary LightningModule whose ``configure_optimizers`` returns ``torch.optim.SGD``;
``GSGDCallback`` turns that SGD into G-SGD at the start of ``fit`` and sets the skeleton weights to 1
(``skeleton_init=True``, the default: it changes the initial function). Offline, CPU only::

    python examples/quickstart.py              # 20 epochs, about 10 s on a 2-core CPU (imports included)
    python examples/quickstart.py --epochs 1   # smoke size
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from _data import digits
from torch import Tensor, nn

from lightning_gsgd import GSGDCallback


class DigitsMLP(L.LightningModule):
    """A ReLU MLP for 64-pixel digits: ``depth`` hidden layers of ``hidden`` units, trained with SGD.

    Args:
        hidden: Width of every hidden layer.
        depth: Number of hidden layers.
        lr: Learning rate.
        momentum: Momentum.
    """

    def __init__(self, hidden: int = 64, depth: int = 3, lr: float = 0.03, momentum: float = 0.9) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        width = 64
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, 10))
        self.example_input_array = torch.zeros(2, 64)  # what GSGDCallback runs to find the ReLU chains

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_acc", (self(x).argmax(dim=1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)


def main(epochs: int = 20, lr: float = 0.03, batch_size: int = 64, seed: int = 0) -> float:
    """Train with G-SGD and return the test accuracy (360 held-out digits)."""
    L.seed_everything(seed, verbose=False)
    data = digits()
    model = DigitsMLP(lr=lr)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        callbacks=[GSGDCallback(skeleton_init=True)],
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, data.train_loader(batch_size, seed))
    (result,) = trainer.test(model, data.test_loader(), verbose=False)
    return float(result["test_acc"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (small models: 1 is fastest)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    accuracy = main(args.epochs, args.lr, args.batch_size, args.seed)
    print(f"G-SGD test accuracy on sklearn digits (360 test images): {accuracy:.3f}")
