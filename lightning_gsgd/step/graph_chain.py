"""What the compiled step (:mod:`lightning_gsgd.step.graph`) needs of one chain, built once from its plan.

A chain's shapes and offsets become constants of the graph; its index tensors travel as one int64
and one float32 tensor (each input costs wrapper and guard time on every call). The sigma and free
tau entries are described by row and column numbers that the graph compares against (float32, so
exact up to 2**24 rows or entries per row).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_gsgd.step.plan import ChainPlan

# Columns of the hyper-parameter table.
LR, WD, K_BUF, K_D, A_D, A_BUF, MIN_RATIO = range(7)
N_HP = 7
# Order of the plan's index tensors in GraphChain.ints, after the L ``sel`` tensors.
INDEX_NAMES = (
    "walk_bf",
    "walk_g_rows",
    "tau_take",
    "sig_take",
    "free",
    "first_free",
    "nxt",
    "free_pos",
    "free_nodes",
    "tau_layer",
    "col_node",
)


@dataclass(frozen=True)
class GraphChain:
    """What the graph needs of one chain: shapes and offsets (constants) and two index tensors.

    Attributes:
        n_layers: Number of layers L.
        hidden: Hidden nodes H.
        shape2: ``(n_out, K)`` per layer.
        koff: Per layer, the offset of its ``K`` entries among the per-entry values of the layers
            after the first (0 for the first layer, which has none).
        ispec: ``(offset, shape)`` in ``ints`` of ``sel[0 .. L-1]`` then of the ``INDEX_NAMES`` tensors.
        fspec: Per layer ``(sig_k, tau_k)`` offsets in ``floats`` (-1 where there is none): the entry
            ``k`` of row ``b``'s sigma weight (``[n_out]``, layers before the last), and the row
            whose free tau weight is entry ``k``, else -1 (``[K]``, layers after the first).
        ints: The int64 index tensors, flattened and concatenated.
        floats: float32: ``0, 1, 2, ...`` (``max K, n_out`` entries), then the ``fspec`` vectors.
    """

    n_layers: int
    hidden: int
    shape2: tuple[tuple[int, int], ...]
    koff: tuple[int, ...]
    ispec: tuple[tuple[int, tuple[int, ...]], ...]
    fspec: tuple[tuple[int, int], ...]
    ints: Tensor
    floats: Tensor


def graph_chain(plan: ChainPlan, centre: tuple[int, ...]) -> GraphChain:
    """The :class:`GraphChain` of a chain from its plan (tensors on the plan's device).

    Args:
        plan: The chain's index plan.
        centre: Per layer, the centre tap (``ChainLayer.centre``).
    """
    L = plan.n_layers
    col_node: list[Tensor] = []
    koff = [0] * L
    k_total = 0
    width = max(max(n_out, n_in * taps) for n_out, n_in, taps in plan.shape3)
    if width > 2**24:  # row and column numbers are compared as float32, exact up to 2**24
        raise ValueError(
            f"GSGD(compiled=True): a chain layer has {width} rows or entries per row, more than the "
            f"compiled step handles (2**24); use compiled=False"
        )
    floats: list[Tensor] = [torch.arange(width, dtype=torch.float32)]
    f_at = width
    fspec: list[tuple[int, int]] = []
    for l, (n_out, n_in, taps) in enumerate(plan.shape3):
        # the pattern of build_chain_plan: sigma entry (b, b % n_in), tau entry (c % n_out, c), both
        # at the centre tap; a tau entry of a hidden layer is free unless it is that row's sigma entry
        sig = tau = -1
        if l < L - 1:
            floats.append(((torch.arange(n_out) % n_in) * taps + centre[l]).float())
            sig, f_at = f_at, f_at + n_out
        if l > 0:
            cols = torch.arange(n_in)
            r = cols % n_out
            free = torch.ones(n_in, dtype=torch.bool) if l == L - 1 else cols != r % n_in
            k_row = torch.full((n_in, taps), -1.0)
            k_row[:, centre[l]] = torch.where(free, r, -1).float()
            floats.append(k_row.reshape(-1))
            tau, f_at = f_at, f_at + n_in * taps
            col_node.append((plan.hoff[l - 1] + cols).repeat_interleave(taps))
            koff[l] = k_total
            k_total += n_in * taps
        fspec.append((sig, tau))
    parts = [*plan.sel] + [getattr(plan, name) for name in INDEX_NAMES[:-1]] + [torch.cat(col_node).to(plan.device)]
    ispec = []
    i_at = 0
    for t in parts:
        ispec.append((i_at, tuple(t.shape)))
        i_at += t.numel()
    ints = torch.cat([t.reshape(-1).long() for t in parts])
    shape2 = tuple((n_out, n_in * taps) for n_out, n_in, taps in plan.shape3)
    return GraphChain(
        L, plan.hidden, shape2, tuple(koff), tuple(ispec), tuple(fspec), ints, torch.cat(floats).to(plan.device)
    )
