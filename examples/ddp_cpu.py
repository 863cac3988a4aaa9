"""G-SGD under DDP on 2 CPU processes (gloo): the quickstart's digits MLP with ``GSGDCallback``.

DDP averages the gradients before ``GSGD.step`` sees them and the step itself is deterministic and
adds no communication, so the two replicas must end bit-identical. At the end of training every
rank gathers both replicas' parameters and checks that; rank zero prints the result and the test
accuracy (and the run fails if the replicas differ)::

    python examples/ddp_cpu.py                         # strategy "ddp": Lightning re-runs this script as rank 1
    python examples/ddp_cpu.py --strategy ddp_spawn    # or ddp_fork
    python examples/ddp_cpu.py --epochs 1              # smoke size

Each process sees half of every epoch (Lightning adds a ``DistributedSampler``), so ``--batch-size``
is per process and a step's global batch is twice as large.
"""

from __future__ import annotations

import argparse
import os
import time

import lightning as L
import torch
from _common import TRAINER_DEFAULTS
from _data import digits
from quickstart import DigitsMLP
from torch import Tensor

from lightning_gsgd import GSGD, GSGDCallback


class ReplicaCheck(L.Callback):
    """After training: check that all replicas hold identical parameters; rank zero prints the result.

    Args:
        x_test: Test inputs (rank zero reports the accuracy on them).
        y_test: Test labels.
    """

    def __init__(self, x_test: Tensor, y_test: Tensor) -> None:
        self.x_test, self.y_test = x_test, y_test

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        flat = torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()])
        gathered = pl_module.all_gather(flat)  # [world_size, n]: a collective, every rank calls it
        identical = all(torch.equal(gathered[0], other) for other in gathered[1:])
        optimizer = trainer.optimizers[0]
        if trainer.is_global_zero:
            with torch.no_grad():
                accuracy = (pl_module(self.x_test).argmax(dim=1) == self.y_test).float().mean().item()
            steps = int(optimizer.steps) if isinstance(optimizer, GSGD) else trainer.global_step
            print(
                f"rank 0 of {trainer.world_size}: {type(optimizer).__name__}, {steps} steps, "
                f"test accuracy on sklearn digits (360 test images): {accuracy:.3f}"
            )
            print(
                f"replicas identical: {identical} ({flat.numel()} parameters on each of "
                f"{trainer.world_size} processes compared bit for bit)"
            )
        if not identical:
            raise RuntimeError("the DDP replicas ended with different parameters")


def main(epochs: int = 20, lr: float = 0.03, batch_size: int = 32, strategy: str = "ddp", seed: int = 0) -> None:
    """Train on 2 CPU processes; rank zero prints the test accuracy and whether the replicas are identical."""
    L.seed_everything(seed, verbose=False)  # the same initial weights on both processes
    data = digits()
    model = DigitsMLP(lr=lr)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        callbacks=[GSGDCallback(skeleton_init=True), ReplicaCheck(data.x_test, data.y_test)],
        **TRAINER_DEFAULTS,  # deterministic; no logger, checkpoints, progress bar or summary
    )
    # Under DDP Lightning swaps the sampler for a DistributedSampler seeded by seed_everything. No
    # torch.Generator in the loader: ddp_spawn cannot pickle one (pytorch/pytorch#146828).
    trainer.fit(model, data.train_loader(batch_size, seed=None))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--strategy", choices=("ddp", "ddp_spawn", "ddp_fork"), default="ddp")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    main(args.epochs, args.lr, args.batch_size, args.strategy, args.seed)
    if os.environ.get("LOCAL_RANK", "0") == "0":  # "ddp" runs this script in both processes
        print(f"({time.perf_counter() - start:.0f} s, {args.epochs} epochs, strategy {args.strategy})")
