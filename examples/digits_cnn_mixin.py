"""A small CNN on scikit-learn's 8x8 digits trained with G-SGD through ``GSGDMixin`` (no callback in the Trainer).

``GSGDMixin`` goes first in the base classes. The module returns an (unbound) ``GSGD`` from
``configure_optimizers``; the mixin finds the ReLU chain (two Conv2d layers, max pooling, flatten,
two Linear layers), binds the optimizer to it and sets the skeleton weights to 1 at the start of
``fit``. ``configure_gsgd`` passes arguments to the callback the mixin adds::

    python examples/digits_cnn_mixin.py              # 15 epochs
    python examples/digits_cnn_mixin.py --epochs 1   # smoke size
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch
from _common import TRAINER_DEFAULTS, Classifier, evaluate
from _data import digits
from torch import nn

from lightning_gsgd import GSGD, GSGDCallback, GSGDMixin


class DigitsCNN(GSGDMixin, Classifier):
    """Conv(1->c) - ReLU - Conv(c->2c) - ReLU - MaxPool 2 - Flatten - Linear(32c->64) - ReLU - Linear(64->10).

    Args:
        channels: Channels of the first convolution (the second has twice as many).
        lr: G-SGD learning rate.
        momentum: Momentum (kept in path coordinates by G-SGD).
    """

    def __init__(self, channels: int = 16, lr: float = 0.02, momentum: float = 0.9) -> None:
        super().__init__()
        self.save_hyperparameters()
        c = channels
        self.net = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(2 * c * 4 * 4, 64), nn.ReLU(),
            nn.Linear(64, 10),
        )  # fmt: skip
        self.example_input_array = torch.zeros(2, 1, 8, 8)

    def configure_optimizers(self) -> GSGD:
        # Bare parameters: the mixin binds this GSGD to the model's topology before the first step.
        return GSGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)

    def configure_gsgd(self) -> GSGDCallback:
        # Every parameter of this CNN lies in its ReLU chain: fail loudly if detection ever says otherwise.
        return GSGDCallback(skeleton_init=True, min_coverage=1.0)


def main(epochs: int = 15, channels: int = 16, lr: float = 0.02, batch_size: int = 64, seed: int = 0) -> float:
    """Train the CNN and return its test accuracy (360 held-out digits)."""
    L.seed_everything(seed, verbose=False)
    data = digits(images=True)
    model = DigitsCNN(channels, lr)
    # no GSGDCallback here: the module brings its own
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, **TRAINER_DEFAULTS)
    trainer.fit(model, data.train_loader(batch_size, seed))
    if not isinstance(trainer.optimizers[0], GSGD) or not trainer.optimizers[0].is_bound:
        raise RuntimeError("expected the mixin to bind the GSGD optimizer")
    return evaluate(trainer, model, data)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (small models: 1 is fastest)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    accuracy = main(args.epochs, args.channels, args.lr, args.batch_size, args.seed)
    print(f"G-SGD (GSGDMixin) CNN test accuracy on sklearn digits (360 test images): {accuracy:.3f}")
    print(f"({time.perf_counter() - start:.0f} s, {args.epochs} epochs, {args.channels} channels, lr {args.lr})")
