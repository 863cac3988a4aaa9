"""LightningModules, data and helpers for the Lightning tests (module level so that DDP spawn can pickle them)."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_gsgd import GSGD, GSGDMixin, detect_topology, init_skeleton_

N_IN, N_OUT = 4, 3


def make_dataset(n: int = 32, seed: int = 0) -> TensorDataset:
    """A small classification set: inputs from a seeded normal, labels from a fixed linear rule."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, N_IN, generator=g)
    w = torch.randn(N_IN, N_OUT, generator=g)
    return TensorDataset(x, (x @ w).argmax(dim=1))


def make_loader(dataset: TensorDataset, batch_size: int = 8) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def sampler_steps(dataset: TensorDataset, world: int, per_rank: int, epochs: int, seed: int = 0) -> list[list[Tensor]]:
    """The sample indices each rank trains on, per optimizer step, as Lightning feeds them.

    Under DDP and ModelParallelStrategy, Lightning replaces the training loader's sampler by
    ``DistributedSampler(shuffle=True, seed=PL_GLOBAL_SEED or 0, drop_last=False)`` and calls
    ``set_epoch(epoch)`` at the start of every epoch, so each epoch has its own order.

    Returns:
        ``steps[k][r]``: the indices of rank ``r``'s batch at optimizer step ``k``.
    """
    steps: list[list[Tensor]] = []
    for epoch in range(epochs):
        orders = []
        for r in range(world):
            sampler = DistributedSampler(dataset, num_replicas=world, rank=r, shuffle=True, seed=seed)
            sampler.set_epoch(epoch)
            orders.append(torch.tensor(list(sampler)))
        n_batches = -(-len(orders[0]) // per_rank)
        steps += [[o[k * per_rank : (k + 1) * per_rank] for o in orders] for k in range(n_batches)]
    return steps


class MLPModule(LightningModule):
    """A 4-8-8-3 ReLU MLP trained with cross-entropy; ``configure_optimizers`` is chosen by arguments.

    Args:
        optimizer: ``"sgd"``, ``"gsgd"`` (unbound), ``"sgd_maximize"``, ``"adam"`` or ``"none"``.
        scheduler: ``None``, ``"step"`` (StepLR every 2 optimizer steps, gamma 0.5) or ``"lambda"``.
        example: Set ``example_input_array``.
    """

    def __init__(
        self,
        lr: float = 0.05,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        optimizer: str = "sgd",
        scheduler: str | None = None,
        example: bool = True,
        hidden: int = 8,
    ) -> None:
        super().__init__()
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.optimizer_kind, self.scheduler_kind = optimizer, scheduler
        self.net = self.build_net(hidden)
        if example:
            self.example_input_array = torch.zeros(2, N_IN)

    def build_net(self, hidden: int) -> nn.Module:
        """The network (``N_IN`` inputs, ``N_OUT`` outputs); a subclass may build another."""
        return nn.Sequential(
            nn.Linear(N_IN, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, N_OUT)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        hp = {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay}
        if self.optimizer_kind == "sgd":
            opt: Any = torch.optim.SGD(self.parameters(), **hp)
        elif self.optimizer_kind == "gsgd":
            opt = GSGD(self.parameters(), **hp)
        elif self.optimizer_kind == "sgd_maximize":
            opt = torch.optim.SGD(self.parameters(), **hp, maximize=True)
        elif self.optimizer_kind == "adam":
            opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        else:
            return None
        if self.scheduler_kind == "step":
            sched: Any = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        elif self.scheduler_kind == "lambda":
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        else:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class ResidualBN(nn.Module):
    """Linear-BN-ReLU, then a residual block ``relu(h + bn(fc(relu(bn(fc(h))))))``, then a Linear: the
    stream's two BatchNorms are one unit per channel (docs/math.md, "Residual streams")."""

    def __init__(self, hidden: int, norm: type[nn.Module]) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Linear(N_IN, hidden), norm(hidden)
        self.fc1, self.bn1 = nn.Linear(hidden, hidden), norm(hidden)
        self.fc2, self.bn2 = nn.Linear(hidden, hidden), norm(hidden)
        self.head = nn.Linear(hidden, N_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn0(self.stem(x)))
        h = torch.relu(h + self.bn2(self.fc2(torch.relu(self.bn1(self.fc1(h))))))
        return self.head(h)


class BNModule(MLPModule):
    """The MLP with BatchNorm after each hidden Linear (``sync``: SyncBatchNorm): the first Linear is an
    S2 layer alone, each BatchNorm's channels are units (S1) of a chain whose next Linear is S2, or
    (the last) ends at the model output. ``residual``: :class:`ResidualBN` instead."""

    def __init__(self, sync: bool = False, residual: bool = False, **kwargs: Any) -> None:
        self.sync = sync
        self.residual = residual
        super().__init__(**kwargs)

    def build_net(self, hidden: int) -> nn.Module:
        norm = nn.SyncBatchNorm if self.sync else nn.BatchNorm1d
        if self.residual:
            return ResidualBN(hidden, norm)
        return nn.Sequential(
            nn.Linear(N_IN, hidden),
            norm(hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            norm(hidden),
            nn.ReLU(),
            nn.Linear(hidden, N_OUT),
        )


class MixinMLP(GSGDMixin, MLPModule):
    """The same MLP with G-SGD built in."""


class MixinBN(GSGDMixin, BNModule):
    """The BatchNorm MLP with G-SGD built in."""


class TanhModule(MLPModule):
    """No ReLU chain: every hidden non-linearity is tanh."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.net = nn.Sequential(nn.Linear(N_IN, 8), nn.Tanh(), nn.Linear(8, N_OUT))


class ManualModule(MLPModule):
    """Manual optimization (refused by GSGDCallback)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


class SaveParams(Callback):
    """Writes every rank's parameters to ``directory/rank{r}.pt`` when training ends."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, Path(self.directory) / f"rank{trainer.global_rank}.pt")
        # which step ran: the number of compiled graph variants of GSGD(compiled=True), else 0
        graphs = getattr(trainer.optimizers[0], "_graphs", None) if trainer.optimizers else None
        (Path(self.directory) / f"graphs{trainer.global_rank}.txt").write_text(
            str(0 if graphs is None else len(graphs.compiled))
        )


def cpu_trainer(**kwargs: Any) -> Trainer:
    """A quiet one-CPU Trainer; ``kwargs`` override the defaults."""
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "deterministic": True,
    }
    defaults.update(kwargs)
    return Trainer(**defaults)


def train_by_hand(
    module: MLPModule,
    batches: Iterable[Any],
    *,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    accumulate: int = 1,
    clip_norm: float | None = None,
    skeleton_init: bool = True,
    autocast_bf16: bool = False,
) -> GSGD:
    """Drive ``GSGD`` without Lightning: the reference every Trainer run is compared with.

    Detects the topology of ``module`` (a copy is trained in place), optionally initializes the
    skeleton, and takes one step per ``accumulate`` batches, scaling each loss by ``1/accumulate``
    as Lightning does.
    """
    topology = detect_topology(module, module.example_input_array)
    if skeleton_init:
        init_skeleton_(topology)
    opt = GSGD(module.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, topology=topology)
    module.train()
    opt.zero_grad()
    for i, batch in enumerate(batches):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
            loss = module.training_step(batch, i)
        (loss / accumulate).backward()
        if (i + 1) % accumulate == 0:
            if clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(module.parameters(), clip_norm)
            opt.step()
            opt.zero_grad()
    return opt


def clone(module: LightningModule) -> LightningModule:
    return copy.deepcopy(module)


def params_of(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "broadcast",
    "broadcast_object_list",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
    "barrier",
    "send",
    "recv",
    "isend",
    "irecv",
)


class NoCollectivesInStep(Callback):
    """Makes every ``torch.distributed`` collective raise while the optimizer's ``step`` runs (DDP tests).

    Must come after ``GSGDCallback`` in the callback list (it wraps the installed optimizer).
    Counts the wrapped steps in ``self.steps``.
    """

    def __init__(self) -> None:
        self.steps = 0

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        import torch.distributed as dist

        opt = trainer.optimizers[0]
        inner = opt.step

        def forbidden(*args: Any, **kwargs: Any) -> None:
            raise AssertionError("a torch.distributed collective ran inside optimizer.step")

        def step(*args: Any, **kwargs: Any) -> Any:
            saved = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}
            for name in saved:
                setattr(dist, name, forbidden)
            try:
                return inner(*args, **kwargs)
            finally:
                for name, fn in saved.items():
                    setattr(dist, name, fn)
                self.steps += 1

        opt.step = step
