"""Residual streams: BatchNorms whose channels are summed, so that they scale together.

In ``relu(x + bn(...))`` channel ``j`` of both terms must be scaled by the same ``c`` for the sum to
scale by ``c``; through identity skips, every BatchNorm that adds into one stream is tied to the
first one (docs/math.md, "Residual streams"). Detection (:mod:`lightning_gsgd.topology.dag`) records
the ties as a union-find forest over BatchNorm op indices whose roots are the earliest BatchNorm of
each stream; :mod:`lightning_gsgd.topology.assemble` makes the root a chain layer with the others'
``gamma``/``beta`` as its tied parameters (``ChainLayer.tied``).
"""

from __future__ import annotations

import torch

from lightning_gsgd.topology.graph import Op
from lightning_gsgd.topology.rules import BATCHNORM
from lightning_gsgd.topology.units import SHIFT, Units, fresh


def tie_root(ties: dict[int, int], op: int) -> int:
    """The earliest BatchNorm whose channels ``op``'s channels are tied to (``op`` itself if none)."""
    while ties.get(op, op) != op:
        op = ties[op]
    return op


def tied_members(ties: dict[int, int]) -> dict[int, list[int]]:
    """Per stream root, the other BatchNorms tied to it, in execution order."""
    out: dict[int, list[int]] = {}
    for m in sorted(ties):
        r = tie_root(ties, m)
        if r != m:
            out.setdefault(r, []).append(m)
    return out


def _whole_bn(u: Units, ops: list[Op]) -> int | None:
    """The BatchNorm op whose channels ``u`` holds, all of them in order, else ``None``."""
    if not u.flat or u.ids.numel() == 0 or int(u.ids[0]) < 0:
        return None
    p = int(u.ids[0]) >> SHIFT
    if not isinstance(ops[p].module, BATCHNORM):
        return None
    return p if torch.equal(u.ids, (p << SHIFT) + torch.arange(u.ids.numel())) else None


def tie_sum(op: Op, units: dict[int, Units], ops: list[Op], ties: dict[int, int]) -> Units | None:
    """For ``a + b`` of two BatchNorms' whole channel sets, in order and of one shape: tie them (in
    ``ties``) and return the sum's units, the earliest BatchNorm's channels. ``None`` (nothing done)
    for any other op, which then ends the units as any sum does."""
    if op.kind != "call" or op.name != "add" or op.kwargs.get("alpha", 1) != 1 or len(op.inputs) != 2:
        return None
    if op.shape is None or any(s not in units or ops[s].shape != op.shape for s in op.inputs):
        return None
    a, b = (units[s] for s in op.inputs)
    pa, pb = _whole_bn(a, ops), _whole_bn(b, ops)
    if pa is None or pb is None or a.layout() != b.layout():
        return None
    ra, rb = tie_root(ties, pa), tie_root(ties, pb)
    root = min(ra, rb)
    ties[ra] = ties[rb] = root
    return fresh(root, a.layout())
