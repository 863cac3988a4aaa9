"""Train an MLP on scikit-learn's bundled digits with G-SGD through a Lightning Trainer; print its test accuracy.

The model is an ordinary LightningModule whose ``configure_optimizers`` returns ``torch.optim.SGD``;
``GSGDCallback`` turns that SGD into G-SGD at the start of ``fit`` and sets the skeleton weights to 1
(``skeleton_init=True``, the default: it changes the initial function). Offline, CPU only::

    python examples/quickstart.py              # 20 epochs, about 10 s on a 2-core CPU (imports included)
    python examples/quickstart.py --epochs 1   # smoke size
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from _common import TRAINER_DEFAULTS, Classifier, evaluate, mlp
from _data import digits

from lightning_gsgd import GSGDCallback


class DigitsMLP(Classifier):
    """A ReLU MLP for 64-pixel digits: ``depth`` hidden layers of ``hidden`` units, trained with SGD.

    Its ``configure_optimizers`` (in ``examples/_common.py``) returns ``torch.optim.SGD``.

    Args:
        hidden: Width of every hidden layer.
        depth: Number of hidden layers.
        lr: Learning rate.
        momentum: Momentum.
    """

    def __init__(self, hidden: int = 64, depth: int = 3, lr: float = 0.03, momentum: float = 0.9) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = mlp(64, hidden, depth, 10)
        self.example_input_array = torch.zeros(2, 64)  # what GSGDCallback runs to find the ReLU chains


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
        **TRAINER_DEFAULTS,  # deterministic; no logger, checkpoints, progress bar or summary
    )
    trainer.fit(model, data.train_loader(batch_size, seed))
    return evaluate(trainer, model, data)


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
