"""The hyper-parameters of one tensor's step, and the coefficients every form of the step takes from them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor


@dataclass(frozen=True)
class Hyper:
    """SGD hyper-parameters of one layer (taken from its parameter group)."""

    lr: float | Tensor
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool


def hyper(group: dict[str, Any]) -> Hyper:
    """The SGD hyper-parameters of a parameter group."""
    return Hyper(
        lr=group["lr"],
        momentum=group["momentum"],
        dampening=group["dampening"],
        weight_decay=group["weight_decay"],
        nesterov=group["nesterov"],
    )


def step_coefficients(hp: Hyper, has_buf: bool) -> tuple:
    """``(lr, wd, k_buf, k_d, a_d, a_buf)`` of one tensor's step: ``buf' = k_buf buf + k_d d`` and
    ``dir = a_d d + a_buf buf'`` (``d`` the path-space gradient with weight decay; ``has_buf``:
    whether the momentum buffer exists, i.e. this is not the first momentum step). The eager tau
    step and the compiled step's hyper-parameter table both take their numbers from here."""
    mu = hp.momentum
    if mu == 0:
        return hp.lr, hp.weight_decay, 0.0, 0.0, 1.0, 0.0
    k_buf, k_d = (mu, 1.0 - hp.dampening) if has_buf else (0.0, 1.0)
    a_d, a_buf = (1.0, mu) if hp.nesterov else (0.0, 1.0)
    return hp.lr, hp.weight_decay, k_buf, k_d, a_d, a_buf
