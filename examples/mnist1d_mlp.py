"""An MLP on MNIST-1D (generated locally by ``mnist1d``) trained with ``GSGDCallback``; prints test accuracy.

The paper's MLP question (a ReLU MLP with 2 hidden layers) on data that needs no download. With
``--compare`` the same model, from the same initial weights and with the same batches, is also
trained with plain SGD, once from PyTorch's initialization and once from G-SGD's skeleton
initialization (which separates the effect of the initialization from that of the update)::

    python examples/mnist1d_mlp.py                      # G-SGD only
    python examples/mnist1d_mlp.py --compare            # G-SGD, SGD, SGD + skeleton init, side by side
    python examples/mnist1d_mlp.py --epochs 1 --num-samples 500 --width 32   # smoke size

One seed and one untuned learning rate: this shows how to run it, it is not a benchmark
(``experiments/study/`` tunes each method and averages over seeds).
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch
from _common import TRAINER_DEFAULTS, Classifier, evaluate, mlp
from _data import Split, mnist1d

from lightning_gsgd import GSGDCallback, detect_topology, init_skeleton_

METHODS = ("gsgd", "sgd", "sgd+skeleton")


class MNIST1DMLP(Classifier):
    """ReLU MLP ``n_in -> width -> width -> n_classes`` trained with ``torch.optim.SGD``.

    Args:
        n_in: Input features.
        n_classes: Output classes.
        width: Width of both hidden layers.
        lr: Learning rate.
        momentum: Momentum.
    """

    def __init__(self, n_in: int, n_classes: int, width: int = 256, lr: float = 0.05, momentum: float = 0.9) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = mlp(n_in, width, 2, n_classes)
        self.example_input_array = torch.zeros(2, n_in)


def train(method: str, data: Split, epochs: int, width: int, lr: float, batch_size: int, seed: int) -> float:
    """Train one model with ``method`` (one of :data:`METHODS`) and return its test accuracy."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    L.seed_everything(seed, verbose=False)  # the same initial weights for every method
    model = MNIST1DMLP(data.x_train.shape[1], data.n_classes, width, lr)
    callbacks = []
    if method == "gsgd":
        callbacks.append(GSGDCallback(skeleton_init=True))
    elif method == "sgd+skeleton":
        init_skeleton_(detect_topology(model, model.example_input_array))  # G-SGD's starting weights, plain SGD
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, callbacks=callbacks, **TRAINER_DEFAULTS)
    trainer.fit(model, data.train_loader(batch_size, seed))
    return evaluate(trainer, model, data)


def main(
    epochs: int = 30,
    width: int = 256,
    lr: float = 0.05,
    batch_size: int = 128,
    num_samples: int = 5000,
    seed: int = 0,
    compare: bool = False,
) -> dict[str, float]:
    """Train G-SGD (and with ``compare`` the two SGD baselines); return each method's test accuracy."""
    data = mnist1d(num_samples)
    methods = METHODS if compare else ("gsgd",)
    return {m: train(m, data, epochs, width, lr, batch_size, seed) for m in methods}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-samples", type=int, default=5000, help="MNIST-1D examples generated (80%% train)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare", action="store_true", help="also train SGD and SGD + skeleton init")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (small models: 1 is fastest)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = main(args.epochs, args.width, args.lr, args.batch_size, args.num_samples, args.seed, args.compare)
    n_test = args.num_samples // 5
    for method, accuracy in results.items():
        print(f"{method:>13} test accuracy on MNIST-1D ({n_test} test examples): {accuracy:.3f}")
    seconds = time.perf_counter() - start
    print(f"({seconds:.0f} s, {args.epochs} epochs, width {args.width}, lr {args.lr}, seed {args.seed})")
