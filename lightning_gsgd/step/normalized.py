"""The S2 step of layers in no chain whose rows BatchNorm normalizes (``Topology.normalized``).

Such a layer is a segment of its own with ``B = F = 1``: its path values are its weights, and row
``k``'s scale is free (S2, docs/math.md, "BatchNorm segments: S1 and S2"). The step is G-SGD on the
slice ``|w_k| = 1``: with ``q = |w_k|`` per row, ``buf' = mu buf + (1 - damp)(q g + wd w / q)`` and
``w' = w - lr q buf'`` (without momentum ``w' = (1 - lr wd) w - lr q^2 g``): torch's SGD with the
row's own scale taken out, so that it commutes with any positive rescaling of the rows. It is the
cheap form with ``s = q`` and ``1 / s = 1 / q``, so it runs through the chain step's passes
(:func:`lightning_gsgd.step.passes.bulk`). A zero row takes no step (``q = 0`` and ``1 / q`` taken as 0).
G-space Adam on such a layer (:func:`adam_normalized_step`) is Adam on the same slice.
The layers' biases are not here: the bias before a BatchNorm keeps torch's rule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_gsgd.step.adam_chain import AdamSlot, apply_adam_tensor
from lightning_gsgd.step.adam_rule import tick
from lightning_gsgd.step.hyper import Hyper
from lightning_gsgd.step.passes import Item
from lightning_gsgd.step.slots import Slot
from lightning_gsgd.topology.types import ChainLayer


def row_scale(w: Tensor) -> tuple[Tensor, Tensor]:
    """``(q, 1 / q)`` of a weight's rows, each ``[n_out, 1, ...]`` (``1 / q`` is 0 on a zero row)."""
    q = torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1)
    inv = torch.where(q > 0, q.reciprocal(), torch.zeros_like(q))
    shape = (w.shape[0],) + (1,) * (w.dim() - 1)
    return q.view(shape), inv.view(shape)


def normalized_items(
    layers: list[ChainLayer], hp_of: dict[int, tuple[Hyper, Any]], state: Any
) -> tuple[list[Item], list[Tensor], list[Tensor]]:
    """The S2 layers with a gradient as :class:`~lightning_gsgd.step.passes.Item` s, and the values that
    must be finite for the step: ``[min, max]`` of each gradient, and the row norms.

    The slots' targets are the parameters themselves; a caller that must not write yet replaces them
    (and the buffer targets) with copies.
    """
    items: list[Item] = []
    grads: list[Tensor] = []
    norms: list[Tensor] = []
    for layer in layers:
        w = layer.weight
        if w.grad is None:
            continue
        st = state.get(w)
        buf = None if st is None else st.get("momentum_buffer")
        q, inv = row_scale(w.detach())
        slot = Slot(w, w.grad, hp_of[id(w)][0], buf, w, owner=w)
        items.append(Item(slot, q, inv, None, q=q, q2=q * q))
        grads.append(torch.stack(torch.aminmax(w.grad)).flatten())
        norms.append(q.reshape(-1))
    return items, grads, norms


def adam_normalized_step(
    layers: list[ChainLayer], hp_of: dict[int, tuple[Any, Any]], state: Any, host_reads: bool
) -> tuple[list[Tensor], list[Tensor], Callable[[Tensor | None], None]]:
    """G-space Adam/AdamW on the S2 layers outside chains: Adam on the slice ``|w_k| = 1`` (gradient
    ``q g``, step ``q`` times Adam's, docs/math.md, "BatchNorm segments: S1 and S2").

    Returns:
        ``(grad_checks, norm_checks, apply)``: the values that must be finite, and the function that
        writes the step (in place with ``None``, else where its ``ok`` flag holds). A zero row's ``q``
        is taken as the smallest normal number: its step is then 0.
    """
    grads: list[Tensor] = []
    norms: list[Tensor] = []
    slots: list[tuple[AdamSlot, Tensor]] = []
    for layer in layers:
        w = layer.weight
        if w.grad is None:
            continue
        hp = hp_of[id(w)][0]
        st = state.get(w)
        slot = AdamSlot(w, w, w.grad, hp)
        slot.tick = tick(hp, None if st is None else st.get("step"), w, host_reads)
        q, _ = row_scale(w.detach())
        grads.append(torch.stack(torch.aminmax(w.grad)).flatten())
        norms.append(q.reshape(-1))
        slots.append((slot, q.clamp_min(torch.finfo(q.dtype).tiny)))

    def apply(ok: Tensor | None) -> None:
        for slot, q in slots:
            apply_adam_tensor(slot, q, None, state, host_reads, ok, tau=None, sig=None)

    return grads, norms, apply
