"""Log the invariant-space diagnostics through Lightning, on every logger, under ``gsgd/`` (``GSGDCallback``).

Lightning glue only: the metrics are computed by :mod:`lightning_gsgd.diagnostics.metrics` and
:func:`lightning_gsgd.topology.selfcheck.invariance_error`. See ``docs/diagnostics.md`` for the keys.

Cadence. Lightning writes step-level values only on its own logging steps (every
``Trainer(log_every_n_steps)`` optimizer steps, and when the trainer is stopping), and on every
other logging step of the epoch it writes again the last value logged under a key. So the
diagnostics are computed exactly on Lightning's logging steps, with Lightning's own condition
restated through public attributes (``trainer.global_step``, ``log_every_n_steps``,
``should_stop``), and every key is logged on every one of them; a sparser cadence would make
Lightning repeat stale values.

Distributed runs. Every value is computed from the DDP-averaged gradients and the replicated
weights (and, for the invariance check, from an example batch that is the same on every rank), so
it is identical on every rank: it is logged on every rank with the same keys and no
``sync_dist`` (no collective). There are no rank-local aggregates to reduce.

Sharded runs (FSDP2). The path diagnostics are computed from each rank's rows plus a few small
``all_reduce`` calls inside :class:`PathDiagnostics` (every rank calls them on the same logging
steps; :mod:`lightning_gsgd.diagnostics.sharded`), so they are again identical on every rank and
logged without ``sync_dist``. ``gsgd/comm_bytes_per_step`` is logged as well
(``GSGD.comm_bytes_per_step``: the size of the step's one all-gather, which every rank receives
whole; no collective). The invariance check is not run on sharded weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_gsgd.diagnostics.metrics import PathDiagnostics, topology_summary
from lightning_gsgd.topology.selfcheck import invariance_error
from lightning_gsgd.topology.types import Topology

PREFIX = "gsgd/"
_LOG_OPTIONS: dict[str, Any] = {
    "on_step": True,
    "on_epoch": False,
    "prog_bar": False,
    "logger": True,
    "sync_dist": False,  # identical on every rank by construction
    "batch_size": 1,  # not a per-sample mean; spares Lightning the batch-size extraction
}


def is_logging_step(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes the step-level logs of the optimizer step about to run.

    Call it before the step (``on_before_optimizer_step``, which runs once per optimizer step, also
    under gradient accumulation). Lightning writes when ``(steps done + 1) % log_every_n_steps == 0``
    or when the trainer is stopping; with one optimizer in automatic optimization (the only set-up
    ``GSGDCallback`` accepts) its count of steps done equals ``trainer.global_step``, which counts
    steps that AMP's GradScaler skipped, as Lightning's does.
    """
    n = trainer.log_every_n_steps
    if n <= 0:
        return False
    return (trainer.global_step + 1) % n == 0 or trainer.should_stop


class DiagnosticsLogger:
    """Computes :class:`~lightning_gsgd.diagnostics.metrics.PathDiagnostics` on logging steps and logs them.

    Hook protocol (the callback calls these): :meth:`setup` at ``on_fit_start``, :meth:`log_summary`
    at ``on_train_start``, :meth:`before_step` at ``on_before_optimizer_step`` and
    :meth:`after_step` once the optimizer step is done (``on_gsgd_step``). On a step that does not
    log, the two step hooks cost one integer test.

    Args:
        enabled: Compute and log the per-step diagnostics at all.
        per_chain: Also log ``gsgd/chain{i}/<key>`` for every chain.
        invariance_check: Also log ``gsgd/invariance_residual`` on every logging step.
        invariance_spread: Log-scale half-width of the random rescaling factors of the check.

    Under sharding (``setup(..., sharded=True)``) the two step hooks also log
    ``gsgd/comm_bytes_per_step``, and the invariance check is off.
    """

    def __init__(self, enabled: bool, per_chain: bool, invariance_check: bool, invariance_spread: float = 1.0) -> None:
        self.enabled = enabled
        self.per_chain = per_chain
        self.invariance_check = invariance_check
        self.invariance_spread = invariance_spread
        self.diagnostics: PathDiagnostics | None = None
        self._topology: Topology | None = None
        self._example: Any = None
        self._pending = False
        self._comm = False  # sharded: log the bytes of the step's all-gather on logging steps
        self._comm_pending = False

    @property
    def active(self) -> bool:
        """Whether per-step diagnostics run in this fit (set by :meth:`setup`)."""
        return self.diagnostics is not None

    def setup(self, trainer: pl.Trainer, topology: Topology, example: Callable[[], Any], sharded: bool = False) -> None:
        """Prepare for a fit: nothing runs later unless the trainer has a logger and logs steps.

        Args:
            trainer: The trainer.
            topology: The model's topology.
            example: Returns an example input for the invariance check (called only if enabled).
            sharded: The chain weights are sharded by ``fully_shard``: also log
                ``gsgd/comm_bytes_per_step`` on logging steps; no invariance check.
        """
        self._topology = topology
        self._pending = self._comm_pending = False
        self.diagnostics = None
        self._example = None
        self._comm = False
        if not (self.enabled and trainer.loggers and trainer.log_every_n_steps > 0 and topology.chains):
            return
        self._comm = sharded
        self.diagnostics = PathDiagnostics(topology, per_chain=self.per_chain)
        if self.invariance_check and not sharded:
            self._example = example()

    def log_summary(self, trainer: pl.Trainer) -> None:
        """Log the fit-start numbers once, on every logger, at the step the fit starts from.

        ``self.log`` is not allowed at fit start, so this writes through each logger's
        ``log_metrics`` the way Lightning itself does (called on every rank; Lightning's loggers
        write on rank 0 only).
        """
        if self._topology is None or not trainer.loggers:
            return
        metrics = {PREFIX + k: v for k, v in topology_summary(self._topology).items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()

    def before_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any = None) -> None:
        """On a logging step: gradient and weight metrics, before the optimizer changes the weights.

        Given the ``GSGD`` about to step, the metrics come out of its step as by-products and are
        logged by :meth:`after_step` (see :meth:`PathDiagnostics.before_step`).
        """
        self._pending = False
        self._comm_pending = self._comm and is_logging_step(trainer)
        if self.diagnostics is None or not is_logging_step(trainer):
            return
        self._log(pl_module, self.diagnostics.before_step(optimizer))
        self._pending = True

    def after_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        """After the step that :meth:`before_step` measured: relative update, counters, invariance check
        (sharded: the bytes the step exchanged)."""
        if self._comm_pending:
            self._comm_pending = False
            nbytes = getattr(optimizer, "comm_bytes_per_step", None)
            if nbytes is not None:
                self._log(pl_module, {"comm_bytes_per_step": float(nbytes)})
        if not self._pending:
            return
        self._pending = False
        assert self.diagnostics is not None
        metrics: dict[str, Tensor | float] = dict(self.diagnostics.after_step(optimizer))
        if self.invariance_check and not self._comm:  # not on sharded weights
            assert self._topology is not None
            generator = torch.Generator().manual_seed(trainer.global_step)  # the same factors on every rank
            metrics["invariance_residual"] = invariance_error(
                pl_module, self._topology, self._example, spread=self.invariance_spread, generator=generator
            )
        self._log(pl_module, metrics)

    @staticmethod
    def _log(pl_module: pl.LightningModule, metrics: dict[str, Any]) -> None:
        pl_module.log_dict({PREFIX + k: v for k, v in metrics.items()}, **_LOG_OPTIONS)
