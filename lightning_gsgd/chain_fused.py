"""The elementwise passes of :mod:`lightning_gsgd.chain_bulk` as ``torch.compile`` kernels (opt-in).

``GSGD(..., compiled=True)`` runs a chain's per-row sums ``sum(w * g)`` and its weight and momentum
update through kernels that ``torch.compile`` generates from the plain tensor expressions below: one
pass that reads ``w``, ``g`` and the buffer and writes ``w`` and the buffer, instead of the five
in-place passes of the eager form (gsgd-math.md section 4b; :mod:`lightning_gsgd.chain_bulk` has the
same formulas). Hyper-parameters enter as a small tensor, so a learning-rate scheduler does not
trigger recompilation; the kernels are compiled per chain structure (number of tensors, which ones
have a row rescale, row or outer-product form) on the first step that needs them.

The expressions are correct without compilation too: if ``torch.compile`` gives up (Dynamo's
recompile limit, an unsupported setup), Dynamo warns and runs them eagerly, with temporaries but the
same results. Each optimizer compiles its own copy of the functions, so Dynamo's per-function cache
and its recompile limit (8 variants) count one optimizer's chains, not every optimizer a process
ever made (a hyper-parameter sweep in one process makes many).
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_gsgd.chain_bulk import slot_key

if TYPE_CHECKING:
    from lightning_gsgd.chain_bulk import Item


def _update(
    ws: list[Tensor],
    gs: list[Tensor],
    bufs: list[Tensor | None],
    rs: list[Tensor],
    Fs: list[Tensor],
    bs: list[Tensor | None],
    rhoinvs: list[Tensor | None],
    hp: Tensor,
    nesterov: bool,
) -> None:
    """One update of every tensor of a group with the same hyper-parameters, in place.

    Per tensor, with ``s = r / b`` (``r`` per row; ``b`` per input column, ``None`` meaning 1) and
    ``f = 1 / s = F b``: ``d = s g + wd f w``; with a buffer ``buf' = mu buf + k d``,
    ``w' = (w - lr s buf') / rho`` (Nesterov: ``((1 - lr wd) w - lr s^2 g - lr mu s buf') / rho``);
    without one (no momentum) ``w' = ((1 - lr wd) w - lr s^2 g) / rho``. ``hp = [lr, mu, k, wd]``
    with ``k = 1 - dampening``; ``rhoinv = 1 / rho`` (``None`` meaning 1).
    """
    lr, mu, k, wd = hp[0], hp[1], hp[2], hp[3]
    for w, g, buf, r, F, b, rhoinv in zip(ws, gs, bufs, rs, Fs, bs, rhoinvs):
        s, f = (r, F) if b is None else (r / b, F * b)
        if buf is None:
            new = (1 - lr * wd) * w - lr * (s * s) * g
        else:
            nb = mu * buf + k * (s * g + wd * (f * w))
            if nesterov:
                new = (1 - lr * wd) * w - lr * (s * s) * g - (lr * mu) * (s * nb)
            else:
                new = w - lr * (s * nb)
            buf.copy_(nb)
        if rhoinv is not None:
            new = new * rhoinv
        w.copy_(new)


def _row_sums(ws: list[Tensor], gs: list[Tensor], outs: list[Tensor]) -> None:
    """``out = sum over each row of w * g`` for every triple (``[n_out, n_in, taps]`` views)."""
    for w, g, out in zip(ws, gs, outs):
        out.copy_((w * g).sum((1, 2)))


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` (a small CPU tensor) on ``device`` without stalling the host: a non-blocking copy from
    pinned memory (the caching host allocator keeps the block until the copy has run)."""
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _own_copy(fn: Any) -> Any:
    """A new function object with a new code object: Dynamo keeps its compiled variants per code object."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class FusedPasses:
    """The compiled kernels of one optimizer (compiled lazily, on first use).

    Args:
        options: Extra keyword arguments for ``torch.compile`` (tests use ``backend="eager"`` and
            ``fullgraph=True``).
    """

    def __init__(self, **options: Any) -> None:
        self.options = options
        self._update: Any = None
        self._sums: Any = None

    def row_sums(self, ws: list[Tensor], gs: list[Tensor], outs: list[Tensor]) -> None:
        """Fill ``outs`` with the per-row sums of ``w * g``."""
        if self._sums is None:
            self._sums = torch.compile(_own_copy(_row_sums), **self.options)
        self._sums(ws, gs, outs)

    def update(self, items: list[Item]) -> list[Item]:
        """Apply the update to every item it covers; returns the items left for the eager passes.

        Covered: tensors without momentum, and tensors with momentum whose buffer exists (the first
        momentum step creates the buffers; it runs once, eagerly).
        """
        left: list[Item] = []
        groups: dict[tuple, list[Item]] = {}
        for it in items:
            if it.slot.hp.momentum != 0 and it.slot.buf is None:
                left.append(it)
            else:
                groups.setdefault(slot_key(it.slot), []).append(it)
        if self._update is None and groups:
            self._update = torch.compile(_own_copy(_update), **self.options)
        for group in groups.values():
            first = group[0]
            hp = first.slot.hp
            ref = first.slot.target
            values = [hp.lr, hp.momentum, 1 - hp.dampening, hp.weight_decay]
            if isinstance(hp.lr, Tensor):
                lr = hp.lr.to(device=ref.device, dtype=torch.float64).reshape(1)
                hpt = torch.cat([lr, _to_device(torch.tensor(values[1:], dtype=torch.float64), ref.device)])
            else:
                hpt = _to_device(torch.tensor(values, dtype=torch.float64), ref.device)
            self._update(
                [it.slot.target for it in group],
                [it.slot.grad for it in group],
                [it.slot.buf_target if hp.momentum != 0 else None for it in group],
                [it.r for it in group],
                [it.F for it in group],
                [it.b for it in group],
                [it.rhoinv for it in group],
                hpt,
                bool(hp.nesterov),
            )
        return left
