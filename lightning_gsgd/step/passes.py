"""The elementwise passes of the G-SGD step over whole tensors (see :mod:`lightning_gsgd.step.chain_step`).

Every chain tensor gets the update of docs/math.md, "The cheap form" from broadcast coefficients:
``s`` (gradient to path coordinates), ``f = 1 / s`` (weight to path value), ``q = s / rho`` (path
step back to weights), ``q2 = s^2 / rho`` and the row rescale ``1 / rho`` (``None`` where it is 1).
All passes are in place (``torch._foreach_*``, one call per pass for all tensors of a chain). Sigma
and tau entries come out wrong here and are overwritten by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_gsgd.step.slots import Slot


@dataclass
class Item:
    """A slot with its broadcast coefficients (see the module docstring).

    ``r = 1 / F`` and ``F`` are per-row vectors; ``b`` is ``None`` (row-only form) or the ``B`` of
    the layer's inputs as a ``[1, n_in, 1]`` column (the general form, ``s = r / b``). ``q`` and
    ``q2`` may be given (row form) or are formed from ``s`` when needed.
    """

    slot: Slot
    r: Tensor
    F: Tensor
    rhoinv: Tensor | None
    b: Tensor | None = None
    q: Tensor | None = None
    q2: Tensor | None = None
    _s: Tensor | None = None

    @property
    def s(self) -> Tensor:
        """``1 / (B F)``: the row vector ``r``, or the outer product ``r / b`` (made once)."""
        if self.b is None:
            return self.r
        if self._s is None:
            self._s = self.r / self.b
        return self._s

    @property
    def f(self) -> Tensor | None:
        """``1 / s`` as a row vector (``F``); ``None`` in the general form (``w / s`` by ``addcdiv``)."""
        return self.F if self.b is None else None

    def q_(self) -> Tensor:
        if self.q is None:
            self.q = self.s if self.rhoinv is None else self.s * self.rhoinv
        return self.q

    def q2_(self) -> Tensor:
        if self.q2 is None:
            self.q2 = self.q_() * self.s
        return self.q2


def slot_key(s: Slot) -> tuple:
    """Hyper-parameters of a slot, comparable without reading tensor values (tensor lr: by identity),
    and whether its momentum buffer is still to be made."""
    hp = s.hp
    lr = ("tensor", id(hp.lr)) if isinstance(hp.lr, Tensor) else hp.lr
    return lr, hp.momentum, hp.dampening, hp.weight_decay, hp.nesterov, s.buf is None


def bulk(items: list[Item]) -> None:
    """Apply the elementwise passes to every item's ``target`` (and ``buf_target``), batched by mode.

    Per tensor, momentum (with weight decay): ``buf *= mu``, ``buf += (1 - damp) s g``,
    ``buf += (1 - damp) wd f w``, ``w -= lr s buf``, ``w *= 1 / rho`` (five in-place passes, like
    torch's SGD with its temporary); without momentum: ``w *= (1 - lr wd) / rho``, ``w -= lr q2 g``.
    """
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
    for it in decay:
        if it.f is None:  # general form: wd w / s
            value = it.slot.hp.weight_decay * ((1 - it.slot.hp.dampening) if it.slot.buf is not None else 1)
            it.slot.buf_target.addcdiv_(it.slot.target, it.s, value=value)  # type: ignore[union-attr]
    decay = [it for it in decay if it.f is not None]
    _addcmul_(
        [it.slot.buf_target for it in decay],  # type: ignore[misc]
        [it.slot.target for it in decay],
        [it.f for it in decay],  # type: ignore[misc]
        [it.slot.hp.weight_decay * ((1 - it.slot.hp.dampening) if it.slot.buf is not None else 1) for it in decay],
    )

    # weights: w' = (w - lr s buf') / rho, or ((1 - lr wd) w - lr s^2 g [- lr mu s buf']) / rho
    light = [it for it in mom if not it.slot.hp.nesterov]
    heavy = plain + [it for it in mom if it.slot.hp.nesterov]
    _addcmul_(
        [it.slot.target for it in light],
        [it.slot.buf_target for it in light],  # type: ignore[misc]
        [it.s for it in light],
        [-it.slot.hp.lr for it in light],
    )
    _mul_([it.slot.target for it in light], [it.rhoinv for it in light])
    _mul_(
        [it.slot.target for it in heavy],
        [_scaled(it.rhoinv, 1 - it.slot.hp.lr * it.slot.hp.weight_decay) for it in heavy],
    )
    _addcmul_(
        [it.slot.target for it in heavy],
        [it.slot.grad for it in heavy],
        [it.q2_() for it in heavy],
        [-it.slot.hp.lr for it in heavy],
    )
    nest = [it for it in heavy if it.slot.hp.momentum != 0]
    _addcmul_(
        [it.slot.target for it in nest],
        [it.slot.buf_target for it in nest],  # type: ignore[misc]
        [it.q_() for it in nest],
        [-it.slot.hp.lr * it.slot.hp.momentum for it in nest],
    )


def _scaled(coef: Tensor | None, scalar: float | Tensor) -> Tensor | float | None:
    """``coef * scalar`` with ``None`` meaning 1; ``None`` when the product is 1."""
    if coef is None:
        return None if (not isinstance(scalar, Tensor) and scalar == 1) else scalar
    if not isinstance(scalar, Tensor) and scalar == 1:
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
    if not any(isinstance(v, Tensor) for v in values):
        torch._foreach_addcmul_(ts, t1, coefs, values)  # type: ignore[arg-type]
    else:
        for t, a, c, v in zip(ts, t1, coefs, values):
            t.addcmul_(a, c * v)
