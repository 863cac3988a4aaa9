"""The path diagnostics of a chain whose weights ``fully_shard`` (FSDP2) shards by rows.

The same quantities as :func:`lightning_gsgd.diagnostics.chain.read_chain` and
:func:`~lightning_gsgd.diagnostics.chain.update_sq`, computed from each rank's rows plus small
exchanges, so that every rank gets the same values:

1. every rank writes, into one vector per chain of ``O(H)`` numbers, the entries of its own rows
   that cross rows: per hidden layer the sigma weight and gradient and ``sum(w g) (+ b gb)`` and
   ``sum(w**2) (+ b**2)`` of each row, per later layer the tau weight of each input node and its
   partial column sums of ``w**2``; zeros elsewhere. One ``all_reduce`` (sum) gives every rank the
   whole vector: each row entry has exactly one owner (``x + 0 = x``, exact), the column sums are
   sums of the ranks' partial sums;
2. every rank computes ``B``, ``F``, ``Gamma``, the skeleton path values and the imbalance terms from
   it (identical inputs, identical results), then the sums of squares of ``v`` and ``dL/dv`` over its
   own rows; a second ``all_reduce`` of two numbers per chain adds them up.

After the step, :func:`sharded_update_sq` exchanges the sigma and tau weights again (``B`` and ``F``
at the new weights) and all-reduces the local ``||v' - v||**2``. So a logging step runs four small
collectives, ``O(H)`` numbers each at most, and no weight is gathered. The sums are reduced in
another order than in one process: the values agree to float32 rounding (tested to 1e-6 relative).
Unlike the unsharded reader, selecting this rank's sigma and tau entries uses boolean masks, which
wait for the device on an accelerator (tested on CPU/gloo only).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_gsgd.diagnostics.chain import FlatIndex
from lightning_gsgd.step.slots import ChainReading
from lightning_gsgd.topology.index import LayerIndex
from lightning_gsgd.topology.shard import is_dtensor
from lightning_gsgd.topology.types import Chain, ChainLayer

#: Per layer this rank's basis-path values (its rows, flat layout, sigma entries 0), and per layer
#: its rows of the hidden bias's values (``None`` for the output layer and layers without a bias).
LocalValues = tuple[list[Tensor], list[Tensor | None]]


def _work(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _local(t: Tensor | None) -> Tensor | None:
    return t.to_local() if is_dtensor(t) else t  # type: ignore[union-attr]


def _group(chain: Chain):
    return chain.layers[0].weight.device_mesh.get_group()


def _rows(layer: ChainLayer, rank: int, world: int) -> tuple[int, int]:
    size = -(-layer.n_out // world)
    return min(rank * size, layer.n_out), min((rank + 1) * size, layer.n_out)


class _Layer:
    """This rank's rows of one layer: ``[a, b)``, local flat weight, gradient, bias, bias gradient (float32+)."""

    def __init__(self, layer: ChainLayer, rank: int, world: int, grads: bool) -> None:
        self.a, self.b = _rows(layer, rank, world)
        self.taps = layer.taps
        self.w = _work(_local(layer.weight.detach())).reshape(self.b - self.a, layer.n_in * layer.taps)
        bias = _local(None if layer.bias is None else layer.bias.detach())
        self.bias = None if bias is None else _work(bias)
        self.g: Tensor | None = None
        self.gb: Tensor | None = None
        if grads:
            g = _local(layer.weight.grad)
            self.g = torch.zeros_like(self.w) if g is None else _work(g.detach()).reshape(self.w.shape)
            if self.bias is not None:
                gb = _local(layer.bias.grad)
                self.gb = torch.zeros_like(self.bias) if gb is None else _work(gb.detach())

    def mine(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Which of ``rows`` (global numbering) this rank holds, and their local row numbers."""
        keep = (rows >= self.a) & (rows < self.b)
        return keep, (rows - self.a).clamp(0, max(self.b - self.a - 1, 0))


def _own(values: Tensor, keep: Tensor) -> Tensor:
    return torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device))


def _backbone(
    chain: Chain, index: list[LayerIndex], locs: list[_Layer], grads: bool, group
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """Round 1: the whole per-row and per-column vectors of every layer, from one ``all_reduce``.

    Returns:
        Per layer (empty tensors where a layer has none): sigma weights, sigma gradients, ``sum(w g)``
        per row, ``sum(w**2)`` per row, tau weights per input node, column sums of ``w**2`` per input node.
    """
    parts: list[Tensor] = []
    sizes: list[int] = []
    last = len(chain.layers) - 1
    dtype, device = locs[0].w.dtype, locs[0].w.device
    empty = torch.zeros(0, dtype=dtype, device=device)
    for l, (layer, idx, loc) in enumerate(zip(chain.layers, index, locs)):
        sig_w = sig_g = dot = sq = tau_w = col = empty
        if l < last:
            assert idx.sig_rows is not None and idx.sig_cols is not None
            keep, r = loc.mine(idx.sig_rows)
            flat_c = idx.sig_cols * loc.taps + idx.centre
            sig_w = _own(loc.w[r, flat_c] if loc.w.numel() else torch.zeros_like(keep, dtype=dtype), keep)
            rows_full = torch.zeros(layer.n_out, dtype=dtype, device=device)
            sq = rows_full.clone()
            sq[loc.a : loc.b] = loc.w.square().sum(1) + (0 if loc.bias is None else loc.bias.square())
            if grads:
                assert loc.g is not None
                sig_g = _own(loc.g[r, flat_c] if loc.g.numel() else torch.zeros_like(keep, dtype=dtype), keep)
                dot = rows_full.clone()
                d = torch.linalg.vecdot(loc.w, loc.g)
                if loc.bias is not None and loc.gb is not None:
                    d = d + loc.bias * loc.gb
                dot[loc.a : loc.b] = d
        if l > 0:
            assert idx.tau_rows is not None
            keep, r = loc.mine(idx.tau_rows)
            cols = torch.arange(idx.n_in, device=device) * loc.taps + idx.centre
            tau_w = _own(loc.w[r, cols] if loc.w.numel() else torch.zeros_like(keep, dtype=dtype), keep)
            col = loc.w.square().sum(0)
            if loc.taps > 1:
                col = col.view(-1, loc.taps).sum(1)
        for t in (sig_w, sig_g, dot, sq, tau_w, col):
            parts.append(t)
            sizes.append(t.numel())
    vec = torch.cat(parts)
    dist.all_reduce(vec, group=group)
    pieces = list(torch.split(vec, sizes))
    return tuple([pieces[k::6][l] for l in range(len(locs))] for k in range(6))  # type: ignore[return-value]


def _b_f(index: list[LayerIndex], sig_w: list[Tensor], tau_w: list[Tensor], like: Tensor) -> tuple[list, list]:
    """``B`` and ``F`` as :func:`lightning_gsgd.topology.index.chain_backbone`, from the exchanged entries."""
    n = len(index)
    B = [torch.ones(index[0].n_in, dtype=like.dtype, device=like.device)]
    for l in range(n - 1):
        B.append(sig_w[l] * B[l][index[l].sig_cols])
    F = [torch.ones(index[-1].n_out, dtype=like.dtype, device=like.device)]
    for l in range(n - 1, 0, -1):
        F.insert(0, tau_w[l] * F[0][index[l].tau_rows])
    return B, F


def _scale(f: Tensor, b: Tensor, taps: int) -> Tensor:
    return torch.outer(f, b if taps == 1 else b.repeat_interleave(taps))


def _local_entries(loc: _Layer, rows: Tensor, cols: Tensor) -> tuple[Tensor, Tensor]:
    """The entries ``(rows, cols)`` (flat columns) that lie in this rank's rows, as local indices."""
    keep = (rows >= loc.a) & (rows < loc.b)
    return rows[keep] - loc.a, cols[keep]


def read_chain_sharded(
    chain: Chain, index: list[LayerIndex], flat: list[FlatIndex]
) -> tuple[ChainReading, LocalValues]:
    """:func:`lightning_gsgd.diagnostics.chain.read_chain` on a row-sharded chain (two ``all_reduce``).

    Returns:
        The reading (identical on every rank) and this rank's path values, for :func:`sharded_update_sq`.
    """
    group = _group(chain)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    locs = [_Layer(layer, rank, world, grads=True) for layer in chain.layers]
    sig_w, sig_g, dot, sq, tau_w, col = _backbone(chain, index, locs, True, group)
    B, F = _b_f(index, sig_w, tau_w, locs[0].w)
    last = len(locs) - 1
    gammas: list[Tensor] = []
    for l in range(last):
        gam = dot[l] - sig_w[l] * sig_g[l]
        if gammas:
            idx = index[l]
            assert idx.sig_is_tau is not None and idx.sig_cols is not None
            gam = gam + torch.where(idx.sig_is_tau, gammas[-1][idx.sig_cols], 0.0)
        gammas.append(gam)
    skeleton: list[Tensor] = []
    terms: list[Tensor] = []
    sums = torch.zeros(2, dtype=locs[0].w.dtype, device=locs[0].w.device)  # grad_sq, value_sq of this rank's rows
    vw: list[Tensor] = []
    vb: list[Tensor | None] = []
    for l, (loc, fi) in enumerate(zip(locs, flat)):
        assert loc.g is not None
        scale = _scale(F[l][loc.a : loc.b], B[l], loc.taps)
        q = loc.g / scale
        v = scale.mul_(loc.w)
        if fi.sig is not None:
            r, c = _local_entries(loc, *fi.sig)
            v[r, c] = 0
            q[r, c] = 0
        if fi.tau is not None:
            rows, cols, nodes = fi.tau
            nodes = nodes - index[l - 1].row_off  # sharded chains are sequences: the previous layer's nodes
            # every rank computes every skeleton value from the exchanged tau weights, rounded as read_chain does
            skeleton.append((F[l][rows] * B[l][nodes] * tau_w[l][nodes]).abs())
            keep = (rows >= loc.a) & (rows < loc.b)
            r, c, n = rows[keep] - loc.a, cols[keep], nodes[keep]
            q[r, c] = q[r, c] - gammas[l - 1][n] / v[r, c]
        sums[1] += torch.linalg.vector_norm(v).square()
        sums[0] += torch.linalg.vector_norm(q).square()
        vw.append(v)
        if l > 0:
            terms.append(0.5 * (torch.log(sq[l - 1]) - torch.log(col[l])))
        vb.append(None)
        if l < last:
            f_loc = F[l][loc.a : loc.b]
            if loc.bias is not None:
                vb[-1] = loc.bias * f_loc
                sums[1] += torch.linalg.vector_norm(vb[-1]).square()
            if loc.gb is not None:
                sums[0] += torch.linalg.vector_norm(loc.gb / f_loc).square()
    dist.all_reduce(sums, group=group)
    return ChainReading(sums[0], sums[1], torch.cat(skeleton), torch.cat(terms)), (vw, vb)


def sharded_update_sq(chain: Chain, kept: LocalValues, index: list[LayerIndex], flat: list[FlatIndex]) -> Tensor:
    """:func:`lightning_gsgd.diagnostics.chain.update_sq` on a row-sharded chain (two ``all_reduce``)."""
    group = _group(chain)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    locs = [_Layer(layer, rank, world, grads=False) for layer in chain.layers]
    sig_w, _, _, _, tau_w, _ = _backbone(chain, index, locs, False, group)
    B, F = _b_f(index, sig_w, tau_w, locs[0].w)
    total = torch.zeros(1, dtype=locs[0].w.dtype, device=locs[0].w.device)
    for l, (loc, k, fi) in enumerate(zip(locs, kept[0], flat)):
        d = _scale(F[l][loc.a : loc.b], B[l], loc.taps).mul_(loc.w).sub_(k)
        if fi.sig is not None:
            r, c = _local_entries(loc, *fi.sig)
            d[r, c] = 0
        total += torch.linalg.vector_norm(d).square()
    for l, (loc, k) in enumerate(zip(locs, kept[1])):
        if loc.bias is not None and k is not None:
            total += torch.linalg.vector_norm(loc.bias * F[l][loc.a : loc.b] - k).square()
    dist.all_reduce(total, group=group)
    return total[0]
