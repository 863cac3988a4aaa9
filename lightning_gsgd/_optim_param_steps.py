"""``GSGD``'s one-tensor writes: the steps of parameters outside chains, and the masked writes.

:class:`GSGDParamStepsMixin` holds the step of a parameter outside every chain (torch's SGD rule)
and of a BN-heuristic layer; :func:`minmax`, :func:`write` and :func:`keep` are the finiteness
reading and the ``torch.where`` writes with which the synchronization-free (accelerator) path
applies a step only when it is finite (``ok``; ``None`` on the CPU, where it writes in place).
The mixin relies on ``torch.optim.Optimizer``'s ``state``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_gsgd._sgd_common import sgd_update_
from lightning_gsgd.bn_heuristic import bn_heuristic_step
from lightning_gsgd.functional import Hyper
from lightning_gsgd.topology import ChainLayer


class GSGDParamStepsMixin:
    """``GSGD``'s steps of single parameters outside chains (each reads and writes ``self.state``)."""

    state: Any

    # --- BN heuristic (detect_topology(bn_mode="authors_heuristic")): one layer, see bn_heuristic.py
    def _bn_heuristic_step(self, layer: ChainLayer, hp: Hyper, ok: Tensor | None) -> None:
        w = layer.weight
        if w.grad is None:
            return
        old = self.state[w].get("momentum_buffer")
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
            self.state[w]["momentum_buffer"] = keep(buf, old, ok)

    # --- end BN heuristic

    def _plain_sgd(self, p: Tensor, hp: Hyper, ok: Tensor | None) -> None:
        # torch.optim.SGD's single-tensor rule, so that parameters outside chains match it bit for
        # bit; in place on the CPU, on a copy applied with ``where`` when ``ok`` is given.
        assert p.grad is not None
        target = p if ok is None else p.clone()
        old = self.state[p].get("momentum_buffer") if hp.momentum != 0 else None
        buf = sgd_update_(
            p, p.grad, old if ok is None or old is None else old.clone(), hp, scratch=False, target=target
        )
        if buf is not None:
            self.state[p]["momentum_buffer"] = keep(buf, old, ok)
        if ok is not None:
            write(p, target, ok)


def minmax(t: Tensor) -> Tensor:
    """``[min, max]`` of a tensor: finite exactly when every entry is (NaN propagates)."""
    lo, hi = torch.aminmax(t)
    return torch.stack([lo, hi]).flatten()


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
