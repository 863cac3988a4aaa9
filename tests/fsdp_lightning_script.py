"""``ModelParallelStrategy`` (FSDP2 in ``configure_model``) with ``GSGDCallback`` on 2 CPU processes.

Run by tests/test_fsdp.py in a subprocess; Lightning starts rank 1 by running this script again.
Writes ``OUT/full.pt`` (2 epochs straight), ``OUT/resumed.pt`` (1 epoch, a distributed checkpoint,
then resumed to 2 epochs), ``OUT/resumed_full.pt`` (the same through a full, one-file checkpoint:
``save_distributed_checkpoint=False``): the gathered parameters and G-SGD's counters, from rank 0; and
``OUT/batches{r}.pt``: the inputs rank ``r`` trained on in the straight fit, one tensor per step; and
``OUT/logged{r}.pt``: per logging step of the straight fit on rank ``r``, ``(step, values)`` of
``gsgd/comm_bytes_per_step`` and three path diagnostics (a logger that records on every rank,
logging every :data:`LOG_EVERY` steps).
Usage: ``PYTHONPATH=<repo root> python tests/fsdp_lightning_script.py OUT``.

``python tests/fsdp_lightning_script.py OUT WORLD OPTIMIZER`` (``OPTIMIZER``: ``sgd`` or ``adamw``, which
the callback turns into GAdamW; ``WORLD`` processes) runs the short form (:func:`main_short`): the straight
fit, and one resumed from a distributed checkpoint, with the optimizer state gathered into ``OUT/full.pt``
and ``OUT/resumed.pt``; ``OUT/logged{r}.pt`` as above.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from lightning_gsgd import GSGDCallback
from tests.lightning_models import MLPModule, cpu_trainer, make_dataset, make_loader

PER_RANK_BATCH, SEED, LOG_EVERY = 4, 0, 3
COUNTERS = ("steps", "skipped_steps", "guard_hits")


class ShardedMLP(MLPModule):
    """The test MLP with 7 hidden units (rows that do not divide by 2), each layer its own FSDP unit.

    ``optimizer="adamw"``: torch's AdamW with amsgrad, betas and decoupled weight decay (the callback turns
    it into GAdamW).
    """

    def configure_optimizers(self) -> Any:
        if self.optimizer_kind == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=0.02, betas=(0.8, 0.99), weight_decay=0.05, amsgrad=True)
        return super().configure_optimizers()

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for m in self.net:
            if isinstance(m, nn.Linear):
                fully_shard(m, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


class RecordBatches(Callback):
    """Keeps the inputs of every training batch this rank receives."""

    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.inputs.append(batch[0].detach().clone())


class EveryRankLogger(Logger):
    """Keeps every ``log_metrics`` call on every rank (Lightning's own loggers write on rank 0 only)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "every_rank"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((-1 if step is None else int(step), dict(metrics)))


def fit(
    epochs: int,
    ckpt_in: str | None = None,
    ckpt_out: str | None = None,
    logger: Any = False,
    distributed: bool = True,
    world: int = 2,
    optimizer: str = "sgd",
) -> dict:
    torch.manual_seed(SEED)
    model = ShardedMLP(lr=0.05, momentum=0.9, weight_decay=1e-3, hidden=7, optimizer=optimizer)
    strategy = ModelParallelStrategy(
        data_parallel_size=world, tensor_parallel_size=1, save_distributed_checkpoint=distributed
    )
    callback, batches = GSGDCallback(), RecordBatches()
    trainer = cpu_trainer(
        strategy=strategy,
        devices=world,
        max_epochs=epochs,
        callbacks=[callback, batches],
        logger=logger,
        log_every_n_steps=LOG_EVERY,
    )
    trainer.fit(model, make_loader(make_dataset(), PER_RANK_BATCH), ckpt_path=ckpt_in)
    if ckpt_out is not None:
        trainer.save_checkpoint(ckpt_out)
    with torch.no_grad():
        out = {k: v.full_tensor().clone() for k, v in model.named_parameters()}
    assert callback.optimizer is not None
    for name in COUNTERS:
        out[name] = torch.tensor(getattr(callback.optimizer, name))
    out["bytes"] = torch.tensor(callback.optimizer.comm_bytes_per_step)
    out["optimizer"] = type(callback.optimizer).__name__
    names = {p: k for k, p in model.named_parameters()}
    for p, st in callback.optimizer.state.items():  # every rank: full_tensor is a collective
        for key, value in st.items():
            out[f"state/{names[p]}.{key}"] = value.full_tensor() if hasattr(value, "full_tensor") else value.clone()
    out["batches"] = batches.inputs
    return out


def main(out: str) -> None:
    logger = EveryRankLogger()
    full = fit(2, logger=logger)
    ckpt = os.path.join(out, "ckpt")
    fit(1, ckpt_out=ckpt)
    resumed = fit(2, ckpt_in=ckpt)
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.save(full.pop("batches"), os.path.join(out, f"batches{rank}.pt"))
    resumed.pop("batches")
    # a full (non-distributed) checkpoint: one file with the whole state dicts
    one_file = os.path.join(out, "full_state.ckpt")
    fit(1, ckpt_out=one_file, distributed=False)
    resumed_full = fit(2, ckpt_in=one_file, distributed=False)
    resumed_full.pop("batches")
    keys = ("gsgd/comm_bytes_per_step", "gsgd/path_grad_norm", "gsgd/relative_update", "gsgd/imbalance")
    logged = [(step, {k: float(m[k]) for k in keys if k in m}) for step, m in logger.rows if keys[0] in m]
    torch.save(logged, os.path.join(out, f"logged{rank}.pt"))
    if rank == 0:
        torch.save(full, os.path.join(out, "full.pt"))
        torch.save(resumed, os.path.join(out, "resumed.pt"))
        torch.save(resumed_full, os.path.join(out, "resumed_full.pt"))


def main_short(out: str, world: int, optimizer: str) -> None:
    """The straight fit (2 epochs, logging) and the one resumed from a distributed checkpoint after 1."""
    logger = EveryRankLogger()
    full = fit(2, logger=logger, world=world, optimizer=optimizer)
    ckpt = os.path.join(out, "ckpt")
    fit(1, ckpt_out=ckpt, world=world, optimizer=optimizer)
    resumed = fit(2, ckpt_in=ckpt, world=world, optimizer=optimizer)
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    full.pop("batches")
    resumed.pop("batches")
    keys = ("gsgd/comm_bytes_per_step", "gsgd/path_grad_norm", "gsgd/relative_update", "gsgd/imbalance")
    logged = [(step, {k: float(m[k]) for k in keys if k in m}) for step, m in logger.rows if keys[0] in m]
    torch.save(logged, os.path.join(out, f"logged{rank}.pt"))
    if rank == 0:
        torch.save(full, os.path.join(out, "full.pt"))
        torch.save(resumed, os.path.join(out, "resumed.pt"))


if __name__ == "__main__":
    if len(sys.argv) > 2:
        main_short(sys.argv[1], int(sys.argv[2]), sys.argv[3])
    else:
        main(sys.argv[1])
