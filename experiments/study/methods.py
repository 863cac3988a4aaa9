"""The methods compared in the study and how each one is set up.

=============== ============================================ ==============================
method          optimizer                                    initial weights
=============== ============================================ ==============================
``sgd``         ``torch.optim.SGD``                          PyTorch default
``sgd+skeleton`` ``torch.optim.SGD``                         default, then ``init_skeleton_``
``gsgd``        ``torch.optim.SGD`` turned into ``GSGD`` by  default, then ``init_skeleton_``
                ``lightning_gsgd.GSGDCallback`` at fit start
``path-sgd``    ``lightning_gsgd.PathSGD``                   PyTorch default
``adam``        ``torch.optim.Adam``                         PyTorch default
``gadam``       ``torch.optim.Adam`` turned into ``GAdam``   default, then ``init_skeleton_``
                by the callback
``adamw``       ``torch.optim.AdamW``                        PyTorch default
``gadamw``      ``torch.optim.AdamW`` turned into ``GAdamW`` default, then ``init_skeleton_``
                by the callback
``adam+skeleton`` ``torch.optim.Adam``                       default, then ``init_skeleton_``
``adamw+skeleton`` ``torch.optim.AdamW``                     default, then ``init_skeleton_``
``gsgd-exact``  as ``gsgd``, the callback with               default, then ``init_skeleton_``
                ``bn_mode="exact"``                          (topology of the exact mode)
``gsgd-heuristic`` as ``gsgd``, the callback with            default, then ``init_skeleton_``
                ``bn_mode="authors_heuristic"``              (topology of that mode)
=============== ============================================ ==============================

The skeleton methods without a ``bn_mode`` of their own detect the topology with the run's
``gsgd_kwargs["bn_mode"]`` (``"sgd"`` when absent): in the BatchNorm experiments that is ``"exact"``,
so ``sgd+skeleton`` starts from ``gsgd-exact``'s weights.

Adam and AdamW use torch's default betas and eps; the run's ``momentum`` is not used by them.

The harness applies the skeleton initialization itself for both skeleton methods (so that
``gsgd`` and ``sgd+skeleton`` provably start from the same weights, and so that the invariance
experiment can rescale *after* it); the callback is therefore built with ``skeleton_init=False``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_gsgd import GSGDCallback, PathSGD, Topology


@dataclass(frozen=True)
class Method:
    """One method of the study.

    Attributes:
        name: The method's name in configs and results.
        optimizer: What trains: ``"sgd"``, ``"gsgd"``, ``"path-sgd"``, ``"adam"``, ``"gadam"``,
            ``"adamw"`` or ``"gadamw"``.
        skeleton: Whether the skeleton initialization is applied before training.
        bn_mode: The callback's and the detection's ``bn_mode`` for this method (``None``: the run's
            ``gsgd_kwargs``, else ``"sgd"``).
    """

    name: str
    optimizer: str
    skeleton: bool
    bn_mode: str | None = None

    @property
    def converted(self) -> bool:
        """Whether ``GSGDCallback`` turns the configured torch optimizer into a G-space one."""
        return self.optimizer in G_SPACE

    @property
    def trained_with(self) -> str:
        """The class name of the optimizer that must have trained (checked by the harness)."""
        return G_SPACE.get(self.optimizer, "")

    @property
    def needs_topology(self) -> bool:
        """Whether the harness must detect the model's topology for this method."""
        return self.skeleton or self.optimizer == "path-sgd"


#: The methods the callback converts, and the G-space optimizer class each one must end up with.
G_SPACE = {"gsgd": "GSGD", "gadam": "GAdam", "gadamw": "GAdamW"}

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("gsgd", "gsgd", True),
        Method("sgd", "sgd", False),
        Method("sgd+skeleton", "sgd", True),
        Method("path-sgd", "path-sgd", False),
        Method("adam", "adam", False),
        Method("gadam", "gadam", True),
        Method("adamw", "adamw", False),
        Method("gadamw", "gadamw", True),
        Method("adam+skeleton", "adam", True),
        Method("adamw+skeleton", "adamw", True),
        Method("gsgd-exact", "gsgd", True, "exact"),
        Method("gsgd-heuristic", "gsgd", True, "authors_heuristic"),
    )
}


def bn_mode_of(method: Method, gsgd_kwargs: dict[str, Any]) -> str:
    """The ``bn_mode`` the method's topology is detected with (and its callback built with)."""
    return method.bn_mode or gsgd_kwargs.get("bn_mode", "sgd")


def get_method(name: str) -> Method:
    """The :class:`Method` called ``name``."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


def build_optimizer(
    method: Method,
    model: nn.Module,
    lr: float,
    momentum: float,
    weight_decay: float,
    topology: Topology | None,
) -> torch.optim.Optimizer:
    """The optimizer a LightningModule's ``configure_optimizers`` returns for ``method``.

    For ``gsgd`` this is a ``torch.optim.SGD`` that :func:`gsgd_callback` converts at fit start (for
    ``gadam``/``gadamw`` a ``torch.optim.Adam``/``AdamW``).
    """
    if method.optimizer == "path-sgd":
        if topology is None:
            raise ValueError("path-sgd needs the model's topology")
        return PathSGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, topology=topology)
    if method.optimizer in ("adam", "gadam"):
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    if method.optimizer in ("adamw", "gadamw"):
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def gsgd_callback(**kwargs: Any) -> GSGDCallback:
    """``lightning_gsgd.GSGDCallback`` for the ``gsgd`` method (skeleton init already done by the harness).

    The learning rate, momentum and weight decay come from the ``torch.optim.SGD`` that
    :func:`build_optimizer` made (the callback converts it and keeps them), so an LR scheduler on
    that optimizer drives G-SGD's lr as it would SGD's.

    Args:
        **kwargs: Further callback arguments (e.g. ``bn_mode="authors_heuristic"`` for the BN ResNet).
    """
    return GSGDCallback(skeleton_init=False, **kwargs)
