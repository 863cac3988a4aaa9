"""Steps of single tensors outside chains, and the masked writes every form of the step uses.

:func:`sgd_update_` is ``torch.optim.SGD``'s rule; :func:`plain_sgd_step` applies it to a parameter
outside every chain and :func:`bn_heuristic_layer_step` steps a BN-heuristic layer, each reading and
writing the optimizer's ``state``. :func:`minmax`, :func:`write` and :func:`keep` are the finiteness
reading and the ``torch.where`` writes with which the synchronization-free (accelerator) path
applies a step only when it is finite (``ok``; ``None`` on the CPU, where it writes in place).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_gsgd.step.bn_heuristic import bn_heuristic_step
from lightning_gsgd.step.hyper import Hyper
from lightning_gsgd.topology.types import ChainLayer


def bn_heuristic_layer_step(layer: ChainLayer, hp: Hyper, state: Any, ok: Tensor | None) -> None:
    """The G-SGD authors' BatchNorm heuristic on one layer (``detect_topology(bn_mode="authors_heuristic")``)."""
    w = layer.weight
    if w.grad is None:
        return
    old = state[w].get("momentum_buffer")
    new_w, buf = bn_heuristic_step(
        layer.weight3d(),
        layer.weight3d(w.grad),
        old,
        layer.centre,
        lr=hp.lr,
        momentum=hp.momentum,
        dampening=hp.dampening,
        weight_decay=hp.weight_decay,
        nesterov=hp.nesterov,
    )
    write(w, new_w, ok)
    if buf is not None:
        state[w]["momentum_buffer"] = keep(buf, old, ok)


def plain_sgd_step(p: Tensor, hp: Hyper, state: Any, ok: Tensor | None) -> None:
    """torch.optim.SGD's single-tensor rule on a parameter outside chains, so that it matches torch bit
    for bit; in place when ``ok`` is ``None``, else on a copy applied with ``where``."""
    assert p.grad is not None
    target = p if ok is None else p.clone()
    old = state[p].get("momentum_buffer") if hp.momentum != 0 else None
    buf = sgd_update_(p, p.grad, old if ok is None or old is None else old.clone(), hp, scratch=False, target=target)
    if buf is not None:
        state[p]["momentum_buffer"] = keep(buf, old, ok)
    if ok is not None:
        write(p, target, ok)


def sgd_update_(
    p: Tensor, d: Tensor, buf: Tensor | None, hp: Hyper, *, scratch: bool, target: Tensor | None = None
) -> Tensor | None:
    """``torch.optim.SGD``'s rule with direction ``d`` (same operations, same rounding).

    Args:
        p: The parameter (read for weight decay).
        d: The direction (the gradient, or a preconditioned one).
        buf: The momentum buffer, updated in place (pass a copy to keep the old one); ``None``
            before the first momentum step.
        hp: Hyper-parameters.
        scratch: Whether ``d`` may be modified in place (saves a temporary); else it is left as is.
        target: Where the new value is written (default ``p`` itself).

    Returns:
        The momentum buffer after the step (a new tensor on the first step); ``None`` without momentum.
    """
    target = p if target is None else target
    if hp.weight_decay != 0:
        d = d.add_(p, alpha=hp.weight_decay) if scratch else d.add(p, alpha=hp.weight_decay)
    if hp.momentum != 0:
        if buf is None:
            buf = d.clone()
        else:
            buf.mul_(hp.momentum).add_(d, alpha=1 - hp.dampening)
        if hp.nesterov:
            d = d.add_(buf, alpha=hp.momentum) if scratch else d.add(buf, alpha=hp.momentum)
        else:
            d = buf
    if isinstance(hp.lr, Tensor):
        target.addcmul_(d, hp.lr.to(target), value=-1)
    else:
        target.add_(d, alpha=-hp.lr)
    return buf if hp.momentum != 0 else None


def minmax(t: Tensor) -> Tensor:
    """``[min, max]`` of a tensor: finite exactly when every entry is (NaN propagates)."""
    lo, hi = torch.aminmax(t)
    return torch.stack([lo, hi]).flatten()


def all_finite(values: list[Tensor], device: torch.device) -> Tensor:
    """A 0-d bool tensor on ``device``: whether every entry of every tensor is finite."""
    if not values:
        return torch.ones((), dtype=torch.bool, device=device)
    return torch.isfinite(torch.cat([v if v.device == device else v.to(device) for v in values])).all()


def write(dst: Tensor, new: Tensor, ok: Tensor | None) -> None:
    """Copy ``new`` into ``dst`` (viewed as ``dst``); only where ``ok`` holds when ``ok`` is given."""
    if ok is None:
        dst.copy_(new.view_as(dst))
    else:
        dst.copy_(torch.where(ok, new.view_as(dst), dst))


def keep(new: Tensor, old: Tensor | None, ok: Tensor | None) -> Tensor:
    """``new``, or where ``ok`` is false the ``old`` buffer (zeros when there was none)."""
    if ok is None:
        return new
    return torch.where(ok, new, torch.zeros_like(new) if old is None else old)
