"""Lightning CLI example: a ReLU MLP on scikit-learn's bundled digits, trained with G-SGD.

Run from the repository root. The callback and optimizer need their full dotted paths
(``lightning_gsgd.GSGDCallback``); the models defined in this file resolve by their short names::

    # the callback from a YAML config (class_path / init_args)
    python examples/cli.py fit --config examples/gsgd_callback.yaml

    # the callback from flags, on a plain LightningModule that returns torch.optim.SGD
    python examples/cli.py fit --model MLPClassifier \
        --trainer.callbacks+=lightning_gsgd.GSGDCallback --trainer.callbacks.lr=0.05

    # the mixin, with the CLI building GSGD from the model's bare parameters
    python examples/cli.py fit --model GSGDMLPClassifier --optimizer lightning_gsgd.GSGD --optimizer.lr=0.05

    # the callback's arguments
    python examples/cli.py fit --trainer.callbacks.help lightning_gsgd.GSGDCallback

Smoke size: add ``--trainer.max_epochs=1``. After ``fit`` the script prints the held-out accuracy.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from _common import Classifier, mlp
from _data import digits
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader

from lightning_gsgd import GSGDMixin


class DigitsData(LightningDataModule):
    """sklearn's bundled 8x8 digits as 64-pixel vectors: 1437 training images, 360 held out for validation.

    Args:
        batch_size: Training batch size (validation uses the 360 held-out images as one batch).
        seed: Seed of the training order.
        split_seed: Seed of the fixed permutation that picks the held-out images.
    """

    def __init__(self, batch_size: int = 64, seed: int = 0, split_seed: int = 0) -> None:
        super().__init__()
        self.batch_size, self.seed, self.split_seed = batch_size, seed, split_seed

    def setup(self, stage: str) -> None:
        self.split = digits(split_seed=self.split_seed)

    def train_dataloader(self) -> DataLoader:
        return self.split.train_loader(self.batch_size, self.seed)

    def val_dataloader(self) -> DataLoader:
        return self.split.test_loader()


class MLPClassifier(Classifier):
    """A ReLU MLP classifier that returns a plain ``torch.optim.SGD`` (add ``GSGDCallback`` for G-SGD).

    Args:
        n_features: Input dimension (match the data's).
        n_classes: Output classes (match the data's).
        hidden: Width of every hidden layer.
        depth: Number of hidden layers.
        lr: SGD learning rate.
        momentum: SGD momentum.
    """

    def __init__(
        self,
        n_features: int = 64,
        n_classes: int = 10,
        hidden: int = 64,
        depth: int = 2,
        lr: float = 0.05,
        momentum: float = 0.9,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = mlp(n_features, hidden, depth, n_classes)
        self.example_input_array = torch.zeros(2, n_features)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_acc", self.accuracy(batch))


class GSGDMLPClassifier(GSGDMixin, MLPClassifier):
    """The same MLP with G-SGD built in: its SGD, or a GSGD the CLI builds (``--optimizer``), runs as G-SGD."""


def cli_main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build (and by default run) the CLI; ``--model`` picks a LightningModule subclass, e.g. ``MLPClassifier``.

    Trainer defaults differ from Lightning's only where an example needs it: 10 epochs (not 1000), no
    logger or checkpoints, and ``lightning_logs/`` (not the working directory) for the saved ``config.yaml``.
    """
    return LightningCLI(
        None,
        DigitsData,
        subclass_mode_model=True,
        args=args,
        run=run,
        trainer_defaults={
            "max_epochs": 10,
            "logger": False,
            "enable_checkpointing": False,
            "default_root_dir": "lightning_logs",
        },
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # models this small only lose time to extra threads; set OMP_NUM_THREADS to choose
    cli = cli_main()
    if cli.trainer.is_global_zero and "val_acc" in cli.trainer.callback_metrics:
        optimizer = type(cli.trainer.optimizers[0]).__name__
        accuracy = float(cli.trainer.callback_metrics["val_acc"])
        print(f"{optimizer} held-out accuracy on sklearn digits (360 images): {accuracy:.3f}")
