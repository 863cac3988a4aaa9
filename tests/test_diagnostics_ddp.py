"""Issue 5 under 2-process DDP: every rank logs the same ``gsgd/`` values, with no collective, and the fit ends."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger

from lightning_gsgd import GSGDCallback
from lightning_gsgd.diagnostics.metrics import PER_CHAIN_KEYS
from tests.lightning_models import _COLLECTIVES, MLPModule, cpu_trainer, make_dataset, make_loader
from tests.test_ddp import clean_distributed  # noqa: F401  (fixture)
from tests.test_diagnostics_logging import STEP_KEYS, SUMMARY_KEYS, column, read_log

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


@contextlib.contextmanager
def _no_collectives() -> Iterator[None]:
    saved = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}

    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a torch.distributed collective ran while GSGDCallback logged its diagnostics")

    for name in saved:
        setattr(dist, name, forbidden)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


class StrictGSGDCallback(GSGDCallback):
    """GSGDCallback whose diagnostics hooks fail on any torch.distributed collective."""

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        with _no_collectives():
            super().on_before_optimizer_step(trainer, pl_module, optimizer)

    def on_gsgd_step(self, trainer: Trainer, pl_module: LightningModule) -> None:
        with _no_collectives():
            super().on_gsgd_step(trainer, pl_module)


class SaveLoggedValues(Callback):
    """Writes every rank's ``gsgd/`` values of every step (from ``callback_metrics``) to ``rank{r}.json``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.steps: dict[int, dict[str, float]] = {}

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        metrics = trainer.callback_metrics
        self.steps[trainer.global_step - 1] = {k: float(v) for k, v in metrics.items() if k.startswith("gsgd/")}

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        path = Path(self.directory) / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps({str(k): v for k, v in self.steps.items()}))


def test_ddp_ranks_log_identical_values_without_collectives(tmp_path, clean_distributed):  # noqa: F811
    strategy = "ddp_spawn" if torch.cuda.is_initialized() else "ddp_fork"
    torch.manual_seed(0)
    model = MLPModule(lr=0.05, momentum=0.9)
    callbacks = [StrictGSGDCallback(per_chain=True, invariance_check=True), SaveLoggedValues(str(tmp_path))]
    logger = CSVLogger(tmp_path, name="run", version=0)
    trainer = cpu_trainer(
        strategy=strategy, devices=2, max_steps=4, log_every_n_steps=2, logger=logger, callbacks=callbacks
    )
    trainer.fit(model, make_loader(make_dataset(), 4))

    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert set(rank0) == {"0", "1", "2", "3"}
    assert rank0 == rank1  # the same keys and bit-identical values on both ranks, at every step
    logged = rank0["3"]
    want = set(STEP_KEYS) | {"gsgd/invariance_residual"} | {f"gsgd/chain0/{k}" for k in PER_CHAIN_KEYS}
    assert want <= set(logged), want - set(logged)
    assert all(math.isfinite(v) for v in logged.values())

    rows = read_log(tmp_path / "run" / "version_0" / "metrics.csv")  # written by rank 0
    for key in SUMMARY_KEYS:
        assert column(rows, key), key
    for key in STEP_KEYS:
        assert column(rows, key) == {1: rank0["1"][key], 3: rank0["3"][key]}, key
