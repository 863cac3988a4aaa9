"""Turn the optimizer a LightningModule configured into a bound ``GSGD`` (from ``torch.optim.SGD``) or
``GAdam``/``GAdamW`` (from ``torch.optim.Adam``/``AdamW``) and keep schedulers attached.

Lightning glue only: no G-SGD math here.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import wraps
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.core.optimizer import _MockOptimizer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.optim import SGD, Adam, AdamW, Optimizer

from lightning_gsgd.optim.gadam import GAdam, GAdamW
from lightning_gsgd.optim.gsgd import GSGD
from lightning_gsgd.topology.types import Topology

# torch.optim.SGD options that GSGD does not have (it is neither fused, foreach nor differentiable).
_SGD_ONLY_KEYS = ("maximize", "foreach", "differentiable", "fused")
# torch.optim.Adam/AdamW options that GAdam does not have; each may keep its default (a false value).
_ADAM_ONLY_KEYS = ("maximize", "foreach", "capturable", "differentiable", "fused")

#: The G-space optimizers the callback binds as they are.
G_OPTIMIZERS = (GSGD, GAdam)

_SUPPORTED = "GSGDCallback converts torch.optim.SGD, Adam and AdamW (or binds lightning_gsgd.GSGD, GAdam, GAdamW)"


def bound_topology(optimizer: Optimizer) -> Topology | None:
    """The topology a configured ``GSGD``/``GAdam``/``GAdamW`` is already bound to, else ``None``."""
    if isinstance(optimizer, G_OPTIMIZERS) and optimizer.is_bound:
        return optimizer.topology
    return None


@dataclass(frozen=True)
class Overrides:
    """Hyper-parameters that replace the configured optimizer's values in every parameter group.

    ``None`` keeps the configured value.
    """

    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    min_ratio: float | None = None
    compiled: bool | None = None

    def apply(self, group: dict[str, Any]) -> None:
        """Write the set fields into one parameter group (in place)."""
        for key in ("lr", "momentum", "weight_decay", "min_ratio"):
            value = getattr(self, key)
            if value is not None:
                group[key] = value


def to_gsgd(optimizer: Optimizer, topology: Topology, overrides: Overrides) -> GSGD | GAdam:
    """Return a bound G-space optimizer for the configured ``optimizer``.

    A ``torch.optim.SGD`` becomes a new ``GSGD``, a ``torch.optim.Adam`` a new ``GAdam`` and a
    ``torch.optim.AdamW`` a new ``GAdamW``, over the same parameter groups, with the same
    hyper-parameters (and any extra group keys, such as a scheduler's ``initial_lr``); a ``GSGD``,
    ``GAdam`` or ``GAdamW`` is bound in place, unless it is already bound, in which case its own
    topology is kept.

    Args:
        optimizer: What ``configure_optimizers`` returned (the raw torch optimizer).
        topology: The model's topology.
        overrides: Hyper-parameters to replace.

    Raises:
        MisconfigurationException: The optimizer is none of those, it is an ``SGD`` with
            ``maximize=True``, an ``Adam``/``AdamW`` with an option GAdam does not have (``maximize``,
            ``foreach``, ``capturable``, ``differentiable``, ``fused``), or an Adam with an override
            that does not apply to it (``momentum``).
    """
    if isinstance(optimizer, GAdam):
        _check_adam_overrides(overrides)
        for group in optimizer.param_groups:
            overrides.apply(group)
        if overrides.compiled is not None:
            optimizer.compiled = overrides.compiled
        if not optimizer.is_bound:
            optimizer.bind(topology)
        return optimizer
    if type(optimizer) in (Adam, AdamW):
        return _to_gadam(optimizer, topology, overrides)
    if isinstance(optimizer, GSGD):
        for group in optimizer.param_groups:
            overrides.apply(group)
        if overrides.compiled is not None:
            optimizer.compiled = overrides.compiled
        if not optimizer.is_bound:
            optimizer.bind(topology)
        return optimizer
    if isinstance(optimizer, _MockOptimizer):
        raise MisconfigurationException(
            "GSGDCallback found no optimizer (configure_optimizers returned None); return "
            "torch.optim.SGD(self.parameters(), lr=...) or lightning_gsgd.GSGD(self.parameters(), lr=...) from it."
        )
    if type(optimizer) is not SGD:
        raise MisconfigurationException(
            f"{_SUPPORTED}, but configure_optimizers returned {type(optimizer).__name__}; return one of those "
            "(on the Lightning CLI: --optimizer SGD, Adam or AdamW), or remove GSGDCallback to keep your optimizer."
        )
    groups = []
    for i, group in enumerate(optimizer.param_groups):
        if group.get("maximize", False):
            raise MisconfigurationException(
                f"GSGDCallback cannot convert torch.optim.SGD(maximize=True) (param group {i}); minimize the "
                "negated objective instead."
            )
        new = {k: v for k, v in group.items() if k not in _SGD_ONLY_KEYS}
        overrides.apply(new)
        groups.append(new)
    if any(optimizer.state.values()):
        rank_zero_warn(
            "GSGDCallback: the torch.optim.SGD being replaced already holds state (momentum buffers); G-SGD keeps "
            "its momentum in path coordinates and starts it afresh."
        )
    defaults = {k: optimizer.defaults[k] for k in ("lr", "momentum", "dampening", "weight_decay", "nesterov")}
    for key in ("lr", "momentum", "weight_decay"):
        if getattr(overrides, key) is not None:
            defaults[key] = getattr(overrides, key)
    if overrides.min_ratio is not None:
        defaults["min_ratio"] = overrides.min_ratio
    return GSGD(groups, **defaults, topology=topology, compiled=overrides.compiled)


def _check_adam_overrides(overrides: Overrides) -> None:
    """Refuse the callback overrides that have no meaning for Adam."""
    if overrides.momentum is not None:
        raise MisconfigurationException(
            "GSGDCallback(momentum=...) applies to SGD only; Adam/AdamW have betas instead: set betas where the "
            "optimizer is built and leave GSGDCallback's momentum at None."
        )


def _to_gadam(optimizer: Optimizer, topology: Topology, overrides: Overrides) -> GAdam:
    """A new bound ``GAdam`` (from ``Adam``) or ``GAdamW`` (from ``AdamW``) with the same groups."""
    _check_adam_overrides(overrides)
    name = type(optimizer).__name__
    decoupled = type(optimizer) is AdamW
    groups = []
    for i, group in enumerate(optimizer.param_groups):
        for key in _ADAM_ONLY_KEYS:
            if group.get(key):
                raise MisconfigurationException(
                    f"GSGDCallback cannot convert torch.optim.{name}({key}={group[key]!r}) (param group {i}): "
                    f"build the {name} without {key} (GAdam steps each tensor eagerly)."
                )
        new = {k: v for k, v in group.items() if k not in _ADAM_ONLY_KEYS}
        new["decoupled_weight_decay"] = bool(group.get("decoupled_weight_decay", decoupled))
        overrides.apply(new)
        groups.append(new)
    if any(optimizer.state.values()):
        rank_zero_warn(
            f"GSGDCallback: the torch.optim.{name} being replaced already holds state (moment estimates); G-space "
            "Adam keeps its moments in path coordinates and starts them afresh."
        )
    defaults = {k: optimizer.defaults[k] for k in ("lr", "betas", "eps", "weight_decay", "amsgrad")}
    for key in ("lr", "weight_decay"):
        if getattr(overrides, key) is not None:
            defaults[key] = getattr(overrides, key)
    if overrides.min_ratio is not None:
        defaults["min_ratio"] = overrides.min_ratio
    if decoupled:
        return GAdamW(groups, **defaults, topology=topology, compiled=overrides.compiled)
    dwd = bool(optimizer.defaults.get("decoupled_weight_decay", False))
    return GAdam(groups, **defaults, decoupled_weight_decay=dwd, topology=topology, compiled=overrides.compiled)


def install_optimizer(trainer: pl.Trainer, old: Optimizer, new: Optimizer) -> None:
    """Put ``new`` in place of ``old`` in the strategy and re-point every LR scheduler that used ``old``."""
    if new is old:
        return
    trainer.strategy.optimizers = [new if opt is old else opt for opt in trainer.strategy.optimizers]
    repointed = False
    for config in trainer.lr_scheduler_configs:
        repointed |= _repoint(config.scheduler, old, new)
    if repointed:
        _track_step_calls(new)


def schedulers_of(trainer: pl.Trainer, optimizer: Optimizer) -> list[Any]:
    """The configured LR schedulers that drive ``optimizer``."""
    return [c.scheduler for c in trainer.lr_scheduler_configs if getattr(c.scheduler, "optimizer", None) is optimizer]


def _repoint(scheduler: Any, old: Optimizer, new: Optimizer) -> bool:
    found = False
    if getattr(scheduler, "optimizer", None) is old:
        scheduler.optimizer = new
        found = True
    # SequentialLR and ChainedScheduler hold child schedulers with their own optimizer reference.
    for child in getattr(scheduler, "_schedulers", ()) or ():
        found |= _repoint(child, old, new)
    return found


def _track_step_calls(optimizer: Optimizer) -> None:
    """Mark ``optimizer.step`` the way a torch LR scheduler does when it is built on an optimizer.

    A scheduler built on the replaced optimizer wrapped *that* optimizer's ``step`` to record that it
    ran; without the same wrapper on the new one, torch warns at the first ``scheduler.step()`` that
    ``optimizer.step()`` was overridden. This mirrors torch's own wrapper (``LRScheduler.__init__``).
    """
    if hasattr(optimizer.step, "_wrapped_by_lr_sched"):
        return
    func = optimizer.step.__func__  # type: ignore[attr-defined]
    opt_ref = weakref.ref(optimizer)

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        opt = opt_ref()
        opt._opt_called = True  # type: ignore[union-attr]
        return func.__get__(opt, opt.__class__)(*args, **kwargs)

    wrapper._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    optimizer.step = wrapper  # type: ignore[method-assign]
