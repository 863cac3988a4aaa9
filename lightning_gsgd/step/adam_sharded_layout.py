"""Where the sharded G-space Adam step (:mod:`lightning_gsgd.step.adam_sharded`) reads, exchanges and
writes each chain's O(H) values: per rank, the sigma and tau entries of its rows (as positions in its
local shard and in the chain's compact skeleton vector) and its hidden rows, and the layout of the one
vector every rank contributes to the step's ``all_gather``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_gsgd.step.adam_plan import AdamChainPlan, AdamPlans
from lightning_gsgd.step.adam_rule import MOMENT_KEYS
from lightning_gsgd.step.sharded import row_range
from lightning_gsgd.topology.types import Chain

#: Per rank, four flags at the end of its vector: ``[min, max]`` of its gradients that are the step's
#: inputs (last chain layers, parameters outside chains), then ``[min, max]`` of its hidden-bias gradients.
FLAGS = 4


@dataclass
class ChainLayout:
    """One chain on this rank: its rows, its skeleton entries, and where the gathered vector puts them.

    Per layer ``l``: ``rows[l]`` its rows ``[a, b)``; ``sig_j[l]`` / ``tau_j[l]`` the indices into the
    layer's sigma / tau entries that lie in those rows, ``sig_local[l]`` / ``tau_local[l]`` their flat
    positions in the local shard, ``start[l]`` where the layer's compact block (``n_sig`` sigma entries,
    then ``n_tau`` tau entries) begins in the chain's compact vector of size ``n_compact``. ``offset``:
    where the chain's segment starts in this rank's vector. ``src_*`` / ``dst_*``: which entries of the
    gathered ``[world * width]`` vector fill the compact weights and gradients, the compact moments
    (tau positions only) and the row sums (``n_rows`` hidden rows of the chain).
    """

    rows: list[tuple[int, int]]
    sig_j: list[Tensor]
    tau_j: list[Tensor]
    sig_local: list[Tensor]
    tau_local: list[Tensor]
    start: list[int]
    n_sig: list[int]
    n_tau: list[int]
    n_compact: int
    n_rows: int
    hoff: list[int]
    offset: int = 0
    n_own: int = 0
    n_own_tau: int = 0
    src: dict[str, Tensor] | None = None
    dst_wg: Tensor | None = None
    dst_tau: Tensor | None = None
    dst_rows: Tensor | None = None


def build_layouts(
    chains: tuple[Chain, ...], plans: AdamPlans, world: int, rank: int, n_moments: int
) -> tuple[list[ChainLayout], int]:
    """Lay out every rank's vector: per chain its skeleton weights and gradients, its tau moments, its
    row sums; then the flags."""
    every = [[_owned(plans.plan(ci, c), c, world, r) for r in range(world)] for ci, c in enumerate(chains)]
    lengths = [0] * world
    for per_rank in every:
        for r, lay in enumerate(per_rank):
            lay.offset = lengths[r]
            lengths[r] += 2 * lay.n_own + n_moments * lay.n_own_tau + _own_rows(lay).numel()
    width = max(lengths, default=0) + FLAGS
    device = chains[0].layers[0].weight.device if chains else torch.device("cpu")
    mine: list[ChainLayout] = []
    for per_rank in every:
        src: dict[str, list[Tensor]] = {k: [] for k in ("w", "g", "rows", *MOMENT_KEYS[:n_moments])}
        for r, lay in enumerate(per_rank):
            n, nt, base = lay.n_own, lay.n_own_tau, r * width + lay.offset
            src["w"].append(base + torch.arange(n))
            src["g"].append(base + n + torch.arange(n))
            for k, key in enumerate(MOMENT_KEYS[:n_moments]):
                src[key].append(base + 2 * n + k * nt + torch.arange(nt))
            at = base + 2 * n + n_moments * nt
            src["rows"].append(at + torch.arange(_own_rows(lay).numel()))
        lay = per_rank[rank]
        lay.src = {k: torch.cat(v).to(device) for k, v in src.items()}
        lay.dst_wg = torch.cat([_compact_pos(x, tau_only=False) for x in per_rank]).to(device)
        lay.dst_tau = torch.cat([_compact_pos(x, tau_only=True) for x in per_rank]).to(device)
        lay.dst_rows = torch.cat([_own_rows(x) for x in per_rank]).to(device)
        for name in ("sig_j", "tau_j", "sig_local", "tau_local"):
            setattr(lay, name, [t.to(device) for t in getattr(lay, name)])
        mine.append(lay)
    return mine, width


def _owned(plan: AdamChainPlan, chain: Chain, world: int, r: int) -> ChainLayout:
    """Rank ``r``'s rows and skeleton entries of ``chain``."""
    rows, sig_j, tau_j, sig_local, tau_local, start, n_sig, n_tau, hoff = [], [], [], [], [], [], [], [], []
    at = h = 0
    for l, layer in enumerate(chain.layers):
        a, b = row_range(layer.n_out, world, r)
        rows.append((a, b))
        row = layer.n_in * layer.taps
        idx = plan.index[l]
        start.append(at)
        hoff.append(h)
        for rws, flat, js, locs, ns in (
            (idx.sig_rows, plan.sig_flat[l], sig_j, sig_local, n_sig),
            (idx.tau_rows, plan.tau_flat[l], tau_j, tau_local, n_tau),
        ):
            if rws is None or flat is None:
                js.append(torch.empty(0, dtype=torch.long))
                locs.append(torch.empty(0, dtype=torch.long))
                ns.append(0)
                continue
            rws, flat = rws.cpu(), flat.cpu()
            j = torch.nonzero((rws >= a) & (rws < b)).flatten()
            js.append(j)
            locs.append(flat[j] - a * row)
            ns.append(rws.numel())
        at += n_sig[-1] + n_tau[-1]
        if l < len(chain.layers) - 1:
            h += layer.n_out
    lay = ChainLayout(rows, sig_j, tau_j, sig_local, tau_local, start, n_sig, n_tau, at, h, hoff)
    lay.n_own = sum(j.numel() for j in sig_j) + sum(j.numel() for j in tau_j)
    lay.n_own_tau = sum(j.numel() for j in tau_j)
    return lay


def _own_rows(lay: ChainLayout) -> Tensor:
    """This layout's hidden rows in the chain's row numbering."""
    parts = [lay.hoff[l] + torch.arange(a, b) for l, (a, b) in enumerate(lay.rows[:-1])]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


def _compact_pos(lay: ChainLayout, *, tau_only: bool) -> Tensor:
    """Positions in the compact vector of the entries the layout's rank holds (in exchange order)."""
    parts = []
    for l in range(len(lay.rows)):
        if not tau_only:
            parts.append(lay.start[l] + lay.sig_j[l])
        parts.append(lay.start[l] + lay.n_sig[l] + lay.tau_j[l])
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
