"""``GSGDCallback``: train a LightningModule's ReLU chains with G-SGD by adding one callback.

Lightning glue only: the G-SGD math lives in :mod:`lightning_gsgd.optim.gsgd` and :mod:`lightning_gsgd.step`.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import BatchSizeFinder, Callback, LearningRateFinder
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_gsgd.lightning.checks import (
    check_automatic_optimization,
    check_single_optimizer,
    check_strategy,
    shards_weights,
)
from lightning_gsgd.lightning.example_input import example_input
from lightning_gsgd.lightning.logger import DiagnosticsLogger, is_logging_step
from lightning_gsgd.lightning.optimizer_swap import Overrides, bound_topology, install_optimizer, schedulers_of, to_gsgd
from lightning_gsgd.lightning.skip_monitor import SkipMonitor
from lightning_gsgd.optim.gadam import GAdam
from lightning_gsgd.optim.gsgd import GSGD
from lightning_gsgd.topology.detect import detect_topology
from lightning_gsgd.topology.shard import is_sharded, refuse_sharded_dags, shard_topology
from lightning_gsgd.topology.skeleton import init_skeleton_
from lightning_gsgd.topology.types import Topology, TopologyError

_STATE_VERSION = 1


class GSGDCallback(Callback):
    r"""Train the model's ReLU chains with G-SGD instead of SGD (Meng et al., ICLR 2019).

    Add it to the Trainer and return an ordinary ``torch.optim.SGD``, ``Adam`` or ``AdamW`` from
    ``configure_optimizers``: at the start of ``fit`` the callback finds the model's ReLU chains,
    replaces the optimizer by its G-space version (:class:`~lightning_gsgd.GSGD`,
    :class:`~lightning_gsgd.GAdam`, :class:`~lightning_gsgd.GAdamW`) with the same parameter groups
    and hyper-parameters (LR schedulers stay attached), and, on a fresh fit, sets the chains' skeleton
    weights to 1. A G-space optimizer returned from ``configure_optimizers`` (or built by the
    Lightning CLI's ``--optimizer lightning_gsgd.GSGD``) is bound to the model instead. Parameters
    outside the chains get the configured optimizer's own rule with the same hyper-parameters.

    Example::

        trainer = Trainer(callbacks=[GSGDCallback(lr=0.05)])

        # Lightning CLI (use the full dotted path):
        #   --trainer.callbacks+=lightning_gsgd.GSGDCallback --trainer.callbacks.lr=0.05

    What is supported and refused (strategies, precisions, optimizers, schedulers, checkpoints), what
    each hook does and what it costs: ``docs/lightning.md``. The ``gsgd/`` diagnostics it logs on every
    logger of the Trainer, once at the start of training and on Lightning's logging steps, identical
    on every rank and without a collective (under FSDP2 sharding, a few small ``all_reduce`` calls on
    logging steps): ``docs/diagnostics.md``.

    The topology is detected on the LightningModule itself, by running its forward once (in eval
    mode, without gradients) on ``example_input_array`` or, when that is not set, on the first
    samples of the training dataset (tensor batches and ``(input, target, ...)`` tuples).

    .. warning:: ``skeleton_init=True`` changes the function the network computes. It runs at the
        start of every ``fit`` that does not resume from ``ckpt_path`` (once per callback instance);
        pass ``skeleton_init=False`` to start G-SGD from weights you want to keep, e.g. a trained model.

    Args:
        lr: Learning rate for every parameter group; ``None`` keeps the configured optimizer's. Cannot
            be combined with an LR scheduler (the scheduler keeps its own base learning rate): set the
            rate where the optimizer is built instead.
        momentum: Momentum for every parameter group (kept in path coordinates); ``None`` keeps the
            configured optimizer's.
        weight_decay: L2 penalty on path values for every parameter group; ``None`` keeps the
            configured optimizer's.
        skeleton_init: Set every chain's skeleton (sigma and tau) weights to 1 at the start of a fresh
            fit; from PyTorch's default initialization G-SGD's path-space step is badly scaled.
        min_ratio: Guard for G-SGD steps: the smallest factor a step may shrink a free path value by,
            in (0, 1); ``None`` keeps the configured ``GSGD``'s value (0.01 by default).
        allow_empty: Train a model without any ReLU chain (every parameter then gets plain SGD) with a
            warning instead of raising.
        min_coverage: Smallest share of the model's parameters, in [0, 1], that must lie in ReLU chains;
            below it the fit stops with an error that lists what was left out.
        include: Module-name patterns (``fnmatch``, e.g. ``"net.*"``); if given, only matching layers
            may be in chains. Passed to :func:`~lightning_gsgd.detect_topology`.
        exclude: Module-name patterns of layers to leave to plain SGD. Passed to
            :func:`~lightning_gsgd.detect_topology`.
        bn_mode: BatchNorm segments: ``"exact"`` (default) finds BatchNorm channels that are hidden
            units (S1) and layers whose rows feed only training-mode BatchNorm (S2 rows);
            ``"sgd"`` leaves layers followed by BatchNorm to plain SGD; ``"authors_heuristic"``
            updates them with the G-SGD authors' heuristic (not exact G-SGD). Passed to
            :func:`~lightning_gsgd.detect_topology`.
        self_check: After detection, rescale every hidden unit at random and check that the model's
            outputs on the example input do not change (one extra forward pass).
        diagnostics: Log the per-step ``gsgd/`` diagnostics on Lightning's logging steps (every
            ``Trainer(log_every_n_steps)`` steps). The fit-start numbers are logged either way.
        per_chain: Also log every per-step diagnostic of each chain ``i`` as ``gsgd/chain{i}/<key>``.
        invariance_check: On every logging step, also rescale the hidden units at random in place, run
            the model's forward in eval mode on the example input, restore the weights bit for bit, and
            log the relative output change as ``gsgd/invariance_residual`` (rounding level when the
            topology is right). Costs two forward passes on the example batch and one copy of the chain
            weights per logging step, and a host synchronization.
        compiled: Run the step (G-SGD's, or G-Adam's) as one ``torch.compile`` graph (see
            :class:`~lightning_gsgd.GSGD`'s ``compiled``; compiles on the first step, then faster than the
            eager step); ``None`` keeps a configured ``GSGD``'s or ``GAdam``'s setting, and lets a
            converted SGD, Adam or AdamW decide by itself (``GSGD``'s and ``GAdam``'s
            default ``compiled=None``: compiled for chains of at least 100,000 parameters when a
            compiler is there).
        skip_warning_fraction: Warn (rank zero) at the first step G-SGD skips, saying why and what to
            do, and again whenever more than this share of the last ``skip_warning_window`` steps were
            skipped; ``None`` switches the warnings off. Read after every step on the CPU, on logging
            steps and at the end of the fit on accelerators.
        skip_warning_window: The number of recent steps that share is taken over.
    """

    def __init__(
        self,
        lr: float | None = None,
        momentum: float | None = None,
        weight_decay: float | None = None,
        skeleton_init: bool = True,
        min_ratio: float | None = None,
        allow_empty: bool = False,
        min_coverage: float = 0.0,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        bn_mode: Literal["exact", "sgd", "authors_heuristic"] = "exact",
        self_check: bool = True,
        diagnostics: bool = True,
        per_chain: bool = False,
        invariance_check: bool = False,
        compiled: bool | None = None,
        skip_warning_fraction: float | None = 0.1,
        skip_warning_window: int = 50,
    ) -> None:
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            if value is not None and value < 0:
                raise ValueError(f"GSGDCallback: {name}={value} must be >= 0 (or None to keep the optimizer's)")
        if min_ratio is not None and not 0.0 < min_ratio < 1.0:
            raise ValueError(f"GSGDCallback: min_ratio={min_ratio} must be in (0, 1)")
        if not 0.0 <= min_coverage <= 1.0:
            raise ValueError(f"GSGDCallback: min_coverage={min_coverage} must be in [0, 1]")
        if bn_mode not in ("exact", "sgd", "authors_heuristic"):
            raise ValueError(f"GSGDCallback: bn_mode={bn_mode!r} must be 'exact', 'sgd' or 'authors_heuristic'")
        if compiled is not None and not isinstance(compiled, bool):
            raise TypeError(f"GSGDCallback: compiled={compiled!r} must be True, False or None")
        if skip_warning_fraction is not None and not 0.0 <= skip_warning_fraction < 1.0:
            raise ValueError(
                f"GSGDCallback: skip_warning_fraction={skip_warning_fraction} must be in [0, 1) (or None: no warnings)"
            )
        if skip_warning_window < 1:
            raise ValueError(f"GSGDCallback: skip_warning_window={skip_warning_window} must be >= 1")
        self.overrides = Overrides(
            lr=lr, momentum=momentum, weight_decay=weight_decay, min_ratio=min_ratio, compiled=compiled
        )
        self.skeleton_init = skeleton_init
        self.allow_empty = allow_empty
        self.min_coverage = min_coverage
        self.detect_options: dict[str, Any] = {
            "include": None if include is None else list(include),
            "exclude": list(exclude or ()),
            "bn_mode": bn_mode,
            "self_check": self_check,
        }
        self.topology: Topology | None = None
        self._skeleton_done = False
        self._loaded_fingerprint: list[tuple[str, tuple[int, ...]]] | None = None
        self._last_step = 0
        self.optimizer: GSGD | GAdam | None = None
        """The G-space optimizer (``GSGD``, ``GAdam`` or ``GAdamW``) this callback installed or bound in the
        current fit (``None`` before ``on_fit_start``)."""
        self.diagnostics = DiagnosticsLogger(diagnostics, per_chain, invariance_check)
        """Logs the ``gsgd/`` diagnostics (see the class docstring)."""
        self._example: Any = None
        self._skips = None if skip_warning_fraction is None else SkipMonitor(skip_warning_fraction, skip_warning_window)
        # ModelParallelStrategy: the topology of the module as built, detected before configure_model shards it
        self._unsharded: Topology | None = None
        # ModelParallelStrategy: GSGD.extra_state() (its counters) from a checkpoint, restored at on_train_start
        self._loaded_extra: dict[str, Any] | None = None

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse unsupported set-ups before anything runs (``fit`` only)."""
        if stage != "fit":
            return
        check_strategy(trainer.strategy)
        check_automatic_optimization(pl_module)
        self._run_before_tuners(trainer)
        self._unsharded = None
        if shards_weights(trainer.strategy):
            self._detect_before_sharding(trainer, pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Detect the topology, install the bound ``GSGD``, initialize the skeleton (fresh fit), set up diagnostics."""
        self._example = None
        configured = check_single_optimizer(trainer.strategy.optimizers)
        if self.overrides.lr is not None and schedulers_of(trainer, configured):
            raise MisconfigurationException(
                "GSGDCallback(lr=...) cannot override the learning rate of an optimizer that has an LR scheduler "
                "(the scheduler keeps its own base learning rate); set lr where the optimizer is built "
                "(configure_optimizers or --optimizer.lr) and leave GSGDCallback's lr at None."
            )
        topology = bound_topology(configured)
        if topology is None and self._unsharded is not None:  # configure_model has sharded the module since setup
            topology = shard_topology(self._unsharded, pl_module)
        if topology is None:
            topology = self._detect(trainer, pl_module)
        self._check_fingerprint(topology)
        optimizer = to_gsgd(configured, topology, self.overrides)
        install_optimizer(trainer, configured, optimizer)
        self.topology = topology
        self.optimizer = optimizer
        rank_zero_info(topology.summary())

        if trainer.ckpt_path is not None:
            self._skeleton_done = True  # resuming: the checkpoint's weights are the ones to keep
        elif self.skeleton_init and not self._skeleton_done:
            init_skeleton_(topology)  # constant values: identical on every rank
            self._skeleton_done = True
            if topology.chains:
                rank_zero_info("GSGDCallback: skeleton weights set to 1 (skeleton_init=True); the function changed.")
        # sharded: the path diagnostics exchange O(H) numbers; the step's bytes are logged too
        self.diagnostics.setup(
            trainer, topology, lambda: self._example_input(trainer, pl_module), sharded=is_sharded(topology)
        )
        self._example = None  # the diagnostics keep their own reference if they need it

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remember the step count the fit starts from (restored by now when resuming), restore G-SGD's counters
        saved by :meth:`state_dict` (sharded fits), log the fit-start numbers."""
        self._last_step = trainer.global_step
        if self._loaded_extra is not None and self.optimizer is not None:
            # after every restore: under ModelParallelStrategy the optimizer state came without it
            self.optimizer.load_extra_state(self._loaded_extra)
        self._loaded_extra = None
        self.diagnostics.log_summary(trainer)
        if self._skips is not None and self.optimizer is not None:
            self._skips.start(self.optimizer)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        """On a logging step, measure the gradients and weights before the step (once per optimizer step)."""
        self.diagnostics.before_step(trainer, pl_module, self.optimizer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Call :meth:`on_gsgd_step` once per optimizer step (not per accumulated micro-batch)."""
        if trainer.global_step > self._last_step:
            self._last_step = trainer.global_step
            self.on_gsgd_step(trainer, pl_module)

    def on_gsgd_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Runs after every optimizer step, on every rank; the place for per-step diagnostics.

        Under ``16-mixed`` the GradScaler may have skipped the step: ``self.optimizer.steps`` counts only
        the steps taken. Log only values that are identical on every rank (see the design notes).
        Subclasses that override it must call ``super().on_gsgd_step(trainer, pl_module)``: it logs the
        diagnostics of the step.
        """
        self.diagnostics.after_step(trainer, pl_module, self.optimizer)
        if self._skips is not None and self.optimizer is not None:
            # reading the counters waits for an accelerator: there only on the steps Lightning logs
            self._skips.check(self.optimizer, wait=is_logging_step(trainer))

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Report the skipped steps not reported yet (one read of the counters)."""
        if self._skips is not None and self.optimizer is not None:
            self._skips.check(self.optimizer, wait=True)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Refuse optimizer state that another optimizer saved (its buffers are not in path coordinates).

        A full (non-distributed) ModelParallelStrategy checkpoint holds torch's full optimizer state dict,
        without GSGD's ``"gsgd"`` entry; this callback's own state then carries it (``optimizer_extra``).
        """
        states = checkpoint.get("optimizer_states") or []
        mine = (checkpoint.get("callbacks") or {}).get(self.state_key) or {}
        saved_by_gsgd = "optimizer_extra" in mine or (bool(states) and "gsgd" in states[0])
        if states and not saved_by_gsgd and any(states[0].get("state", {}).values()):
            raise MisconfigurationException(
                "GSGDCallback cannot resume from this checkpoint: its optimizer state was not saved by GSGD, GAdam "
                "or GAdamW, whose buffers and moments are in path coordinates; load only the weights "
                "(Model.load_from_checkpoint(path)) and start a new fit with GSGDCallback(skeleton_init=False)."
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        """Small and ``weights_only``-safe: a version, the skeleton flag and the topology fingerprint; under
        ``ModelParallelStrategy`` also the optimizer's ``extra_state()`` (the counters), which torch's distributed
        optimizer state dict drops (it keeps only ``state`` and ``param_groups``)."""
        fingerprint = self.topology.fingerprint() if self.topology is not None else self._loaded_fingerprint
        state = {"version": _STATE_VERSION, "skeleton_done": self._skeleton_done, "fingerprint": fingerprint}
        if self._unsharded is not None and isinstance(self.optimizer, (GSGD, GAdam)):
            extra = self.optimizer.extra_state()  # identical on every rank: the counters count global decisions
            extra["counters"] = {k: v.cpu() for k, v in extra["counters"].items()}
            state["optimizer_extra"] = extra
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self._skeleton_done = bool(state_dict.get("skeleton_done", True))
        self._loaded_extra = state_dict.get("optimizer_extra")
        fingerprint = state_dict.get("fingerprint")
        self._loaded_fingerprint = (
            None if fingerprint is None else [(str(name), tuple(shape)) for name, shape in fingerprint]
        )

    # ------------------------------------------------------------------ helpers
    def _example_input(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        if self._example is None:
            self._example = example_input(trainer, pl_module)
        return self._example

    def _detect(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Topology:
        from lightning_gsgd.topology.report import refusal  # short refusals: counts, grouped reasons, the fix

        # Outside the precision plugin's autocast: the self-check compares outputs at full precision.
        x = self._example_input(trainer, pl_module)
        topology = detect_topology(pl_module, x, allow_empty=True, **self.detect_options)
        if not topology.chains and not topology.bn_layers:
            if not self.allow_empty:
                head = (
                    f"GSGDCallback found no ReLU chain in {type(pl_module).__name__}, so G-SGD would be plain SGD "
                    "(GSGDCallback(allow_empty=True) runs it anyway; all fixes at the end)."
                )
                fix = [
                    "GSGDCallback(allow_empty=True) to train every parameter with plain SGD",
                    "remove GSGDCallback to train the model with plain SGD",
                ]
                raise TopologyError(refusal(head, topology, fix), topology=topology)
            rank_zero_warn(
                f"GSGDCallback found no ReLU chain in {type(pl_module).__name__}: every parameter gets plain SGD "
                "(allow_empty=True)."
            )
        elif topology.coverage < self.min_coverage:
            head = (
                f"GSGDCallback: only {100 * topology.coverage:.1f}% of the parameters lie in ReLU chains, below "
                f"min_coverage={self.min_coverage}; lower min_coverage or change the layers listed below."
            )
            fix = [f"GSGDCallback(min_coverage={int(1000 * topology.coverage) / 1000}) or lower"]
            raise TopologyError(refusal(head, topology, fix), topology=topology)
        return topology

    def _detect_before_sharding(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """ModelParallelStrategy: detect on the module as built (whole weights, before ``configure_model``
        shards it with ``fully_shard``) and set the skeleton there; ``on_fit_start`` re-points the topology
        at the sharded parameters. When resuming, the checkpoint's weights replace the skeleton later."""
        device = next((p.device for p in pl_module.parameters()), None)
        x = self._example_input(trainer, pl_module)
        if device is not None:
            x = move_data_to_device(x, device)  # the module is not on the strategy's device yet
        self._example = x
        self._unsharded = self._detect(trainer, pl_module)
        refuse_sharded_dags(self._unsharded, "GSGDCallback under ModelParallelStrategy")
        if self.skeleton_init and not self._skeleton_done:
            init_skeleton_(self._unsharded)  # constant values: identical on every rank
            self._skeleton_done = True
            if self._unsharded.chains:
                rank_zero_info("GSGDCallback: skeleton weights set to 1 (skeleton_init=True); the function changed.")
        self._example = None

    def _check_fingerprint(self, topology: Topology) -> None:
        if self._loaded_fingerprint is not None and self._loaded_fingerprint != topology.fingerprint():
            saved, now = self._loaded_fingerprint, topology.fingerprint()
            first = next((i for i, (a, b) in enumerate(zip(saved, now)) if a != b), min(len(saved), len(now)))
            was, got = (f"{fp[first][0]} {fp[first][1]}" if first < len(fp) else "nothing" for fp in (saved, now))
            raise TopologyError(
                "GSGDCallback: the checkpoint was saved for a model with other ReLU chains "
                f"(saved {len(saved)} chain parameters, now {len(now)}; the first difference, entry {first}: "
                f"saved {was}, now {got}); resume with the same model."
            )

    def _run_before_tuners(self, trainer: pl.Trainer) -> None:
        """Move this callback in front of the LR and batch-size finders.

        Those run their trial fits inside their own ``on_fit_start``; they must see the bound GSGD and
        the initialized skeleton, which this callback's ``on_fit_start`` sets up.
        """
        callbacks = list(trainer.callbacks)
        tuners = [i for i, cb in enumerate(callbacks) if isinstance(cb, (LearningRateFinder, BatchSizeFinder))]
        mine = next(i for i, cb in enumerate(callbacks) if cb is self)
        if tuners and tuners[0] < mine:
            others = [cb for cb in callbacks if cb is not self]
            trainer.callbacks = others[: tuners[0]] + [self] + others[tuners[0] :]
