"""Lightning CLI example: a small ReLU MLP on generated data, trained with G-SGD.

Run from the repository root (class paths are written in full; short names only resolve once imported):

    # the callback from a YAML config (class_path / init_args)
    python -m examples.cli fit --config examples/gsgd_callback.yaml

    # the callback from flags, on a plain LightningModule that returns torch.optim.SGD
    python -m examples.cli fit --model examples.cli.MLP \
        --trainer.callbacks+=lightning_gsgd.GSGDCallback --trainer.callbacks.lr=0.05

    # the mixin, with the CLI building GSGD from the model's bare parameters
    python -m examples.cli fit --model examples.cli.GSGDMLP --optimizer lightning_gsgd.GSGD --optimizer.lr=0.05

    # the callback's arguments
    python -m examples.cli fit --trainer.callbacks.help lightning_gsgd.GSGDCallback
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gsgd import GSGDMixin


class BlobData(LightningDataModule):
    """Gaussian blobs: ``n_classes`` random centres in ``n_features`` dimensions, generated from ``seed``.

    Args:
        n_samples: Training samples (a quarter as many again are drawn for validation).
        n_features: Input dimension.
        n_classes: Number of blobs (classes).
        batch_size: Batch size of both loaders.
        seed: Seed of the generator that draws centres and samples.
    """

    def __init__(
        self, n_samples: int = 512, n_features: int = 16, n_classes: int = 4, batch_size: int = 32, seed: int = 0
    ) -> None:
        super().__init__()
        self.n_samples, self.n_features, self.n_classes = n_samples, n_features, n_classes
        self.batch_size, self.seed = batch_size, seed

    def setup(self, stage: str) -> None:
        g = torch.Generator().manual_seed(self.seed)
        centres = 3.0 * torch.randn(self.n_classes, self.n_features, generator=g)

        def draw(n: int) -> TensorDataset:
            y = torch.randint(self.n_classes, (n,), generator=g)
            return TensorDataset(centres[y] + torch.randn(n, self.n_features, generator=g), y)

        self.train_set, self.val_set = draw(self.n_samples), draw(self.n_samples // 4)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)


class MLP(LightningModule):
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
        n_features: int = 16,
        n_classes: int = 4,
        hidden: int = 64,
        depth: int = 2,
        lr: float = 0.05,
        momentum: float = 0.9,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        width = n_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, n_classes))
        self.net = nn.Sequential(*layers)
        self.example_input_array = torch.zeros(2, n_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self(x).argmax(dim=1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)


class GSGDMLP(GSGDMixin, MLP):
    """The same MLP with G-SGD built in: its SGD, or a GSGD the CLI builds (``--optimizer``), runs as G-SGD."""


def cli_main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build (and by default run) the CLI; ``--model`` picks any LightningModule subclass, e.g. ``examples.cli.MLP``."""
    return LightningCLI(
        None,
        BlobData,
        subclass_mode_model=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    cli_main()
