"""The elementwise passes of the G-SGD step over whole tensors (see :mod:`lightning_gsgd.chain_step`).

Every chain tensor gets the update of gsgd-math.md section 4b from broadcast coefficients:
``s`` (gradient to path coordinates), ``f = 1 / s`` (weight to path value), ``q = s rho`` (path value
back to weight), ``q2 = s^2 rho`` and the row rescale ``rho`` (``None`` where it is 1). With momentum
this is torch's own fused SGD kernel run on path values; without it (or where that kernel does not
exist) a few ``torch._foreach_*`` passes. Sigma and tau entries come out wrong here and are
overwritten by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Real
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lightning_gsgd.chain_step import Slot

_FUSED_DEVICES = ("cpu", "cuda")
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class Item:
    """A slot with its broadcast coefficients and an optional scratch tensor of its shape."""

    slot: Slot
    s: Tensor
    f: Tensor
    q: Tensor
    q2: Tensor
    rho: Tensor | None
    scratch: Tensor | None


def bulk(items: list[Item]) -> None:
    """Apply the elementwise passes to every item's ``target`` (and ``buf_target``)."""
    fused: list[Item] = []
    rest: list[Item] = []
    for it in items:
        (fused if _fusable(it) else rest).append(it)
    if fused:
        _bulk_fused(fused)
    if rest:
        _bulk_foreach(rest)


def _fusable(it: Item) -> bool:
    t = it.slot.target
    hp = it.slot.hp
    return (
        hp.momentum != 0
        and not isinstance(hp.lr, Tensor)
        and t.device.type in _FUSED_DEVICES
        and t.dtype in _FUSED_DTYPES
        and hasattr(torch, "_fused_sgd_")
    )


def _bulk_fused(items: list[Item]) -> None:
    """Momentum: ``P = s g``; ``w *= f`` (path values); fused SGD on ``(w, P, buf)``; ``w *= q``."""
    targets = [it.slot.target for it in items]
    path_grads: list[Tensor | None] = [
        None if it.scratch is None else torch.mul(it.slot.grad, it.s, out=it.scratch) for it in items
    ]
    small = [i for i, pg in enumerate(path_grads) if pg is None]
    if small:
        made = torch._foreach_mul([items[i].slot.grad for i in small], [items[i].s for i in small])
        for i, pg in zip(small, made):
            path_grads[i] = pg
    torch._foreach_mul_(targets, [it.f for it in items])
    groups: dict[tuple, list[int]] = {}
    for i, it in enumerate(items):
        hp = it.slot.hp
        key = (hp.lr, hp.momentum, hp.dampening, hp.weight_decay, hp.nesterov, it.slot.buf is None)
        groups.setdefault(key, []).append(i)
    for (lr, mu, damp, wd, nesterov, first), idx in groups.items():
        if first:
            for i in idx:
                items[i].slot.buf_target = torch.empty_like(targets[i])
        torch._fused_sgd_(
            [targets[i] for i in idx],
            [path_grads[i] for i in idx],
            [items[i].slot.buf_target for i in idx],  # type: ignore[misc]
            weight_decay=wd,
            momentum=mu,
            lr=lr,
            dampening=damp,
            nesterov=nesterov,
            maximize=False,
            is_first_step=first,
        )
    torch._foreach_mul_(targets, [it.q for it in items])


def _scaled(coef: Tensor | None, scalar: float | Tensor) -> Tensor | float | None:
    """``coef * scalar`` with ``None`` meaning 1; ``None`` when the product is 1."""
    if coef is None:
        return None if (isinstance(scalar, Real) and scalar == 1) else scalar
    if isinstance(scalar, Real) and scalar == 1:
        return coef
    return coef * scalar


def _mul_(ts: list[Tensor], coefs: list[Tensor | float | None]) -> None:
    """``t *= coef`` for every pair (``None``: skip); one foreach call for the tensor coefficients."""
    tt = [t for t, c in zip(ts, coefs) if isinstance(c, Tensor)]
    tc = [c for c in coefs if isinstance(c, Tensor)]
    if tt:
        torch._foreach_mul_(tt, tc)
    for t, c in zip(ts, coefs):
        if c is not None and not isinstance(c, Tensor):
            t.mul_(c)


def _addcmul_(ts: list[Tensor], t1: list[Tensor], coefs: list[Tensor], values: list[float | Tensor]) -> None:
    """``t += value * t1 * coef`` for every triple, in one foreach call when the values are numbers."""
    if not ts:
        return
    if all(isinstance(v, Real) for v in values):
        torch._foreach_addcmul_(ts, t1, coefs, [float(v) for v in values])  # type: ignore[arg-type]
    else:
        for t, a, c, v in zip(ts, t1, coefs, values):
            t.addcmul_(a, c * v)


def _bulk_foreach(items: list[Item]) -> None:
    """The passes with ``torch._foreach_*`` ops, batched by momentum mode (no temporaries)."""
    mom = [it for it in items if it.slot.hp.momentum != 0]
    plain = [it for it in items if it.slot.hp.momentum == 0]

    # momentum buffers: buf' = mu buf + (1 - damp)(s g + wd f w), or s g + wd f w on the first step
    old = [it for it in mom if it.slot.buf is not None]
    new = [it for it in mom if it.slot.buf is None]
    if old:
        bufs = [it.slot.buf_target for it in old]
        torch._foreach_mul_(bufs, [it.slot.hp.momentum for it in old])  # type: ignore[arg-type]
        _addcmul_(bufs, [it.slot.grad for it in old], [it.s for it in old], [1 - it.slot.hp.dampening for it in old])
    if new:
        made = torch._foreach_mul([it.slot.grad for it in new], [it.s for it in new])
        for it, b in zip(new, made):
            it.slot.buf_target = b
    decay = [it for it in mom if it.slot.hp.weight_decay != 0]
    _addcmul_(
        [it.slot.buf_target for it in decay],  # type: ignore[misc]
        [it.slot.target for it in decay],
        [it.f for it in decay],
        [it.slot.hp.weight_decay * ((1 - it.slot.hp.dampening) if it.slot.buf is not None else 1) for it in decay],
    )

    # weights: w' = rho (w - lr s buf'), or rho ((1 - lr wd) w - lr s^2 g [- lr mu s buf'])
    light = [it for it in mom if not it.slot.hp.nesterov]
    heavy = plain + [it for it in mom if it.slot.hp.nesterov]
    _mul_([it.slot.target for it in light], [it.rho for it in light])
    _addcmul_(
        [it.slot.target for it in light],
        [it.slot.buf_target for it in light],  # type: ignore[misc]
        [it.q for it in light],
        [-it.slot.hp.lr for it in light],
    )
    _mul_(
        [it.slot.target for it in heavy],
        [_scaled(it.rho, 1 - it.slot.hp.lr * it.slot.hp.weight_decay) for it in heavy],
    )
    _addcmul_(
        [it.slot.target for it in heavy],
        [it.slot.grad for it in heavy],
        [it.q2 for it in heavy],
        [-it.slot.hp.lr for it in heavy],
    )
    nest = [it for it in heavy if it.slot.hp.momentum != 0]
    _addcmul_(
        [it.slot.target for it in nest],
        [it.slot.buf_target for it in nest],  # type: ignore[misc]
        [it.q for it in nest],
        [-it.slot.hp.lr * it.slot.hp.momentum for it in nest],
    )
