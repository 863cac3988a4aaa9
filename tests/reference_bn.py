"""The straightforward reference of G-SGD on BatchNorm segments, for the tests (docs/math.md,
"BatchNorm segments: S1 and S2").

Full-size temporaries, like tests/reference_step.py, whose chain step this extends by one per-row
factor: ``n`` of the S2 row where each row's tau chain ends (1 where it ends at no S2 row), with
``n_k`` the sum of squares of the path values of the edges into S2 row ``k``, and ``s = sqrt(n)``.
On every coordinate ``v`` (a basis-path value) with path gradient ``p = dL/dv``:

    d = p + wd v / n,   buf' = mu buf + (1 - damp) s d   (s d on the first step),
    direction = buf'  (Nesterov: s d + mu buf'),          v' = v - lr s direction,

then the guard and the map back of docs/math.md with every sigma weight fixed. A layer whose rows
feed a BatchNorm but which is in no chain takes the same rule with ``v = w`` (``B = F = 1``).
Everything else (BatchNorm affines that are no units, biases before a BatchNorm, output biases)
takes ``torch.optim.SGD``'s rule. With no S2 row, ``n = s = 1`` and this is tests/reference_step.py
bit for bit. ``buffer="path"`` is the variant with the buffer in path coordinates
(``buf' = mu buf + (1 - damp) d``, ``v' = v - lr n direction``), kept to show that it is
equivariant too and differs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_gsgd.step.hyper import Hyper
from lightning_gsgd.topology.index import (
    LayerIndex,
    chain_backbone,
    chain_gamma,
    chain_index,
    sigma_entries,
    tau_entries,
)
from tests.bn_models import BnSpec
from tests.reference_step import _sgd_direction


def _move(v: Tensor, p: Tensor, n: Tensor, buf: Tensor | None, hp: Hyper, buffer: str):
    """``(lr s direction, buf')`` for coordinates ``v`` with path gradient ``p`` and block factor ``n``
    (broadcast): the step is ``v' = v - lr s direction``."""
    d = p + hp.weight_decay * v / n if hp.weight_decay != 0 else p
    if buffer == "path":
        direction, buf = _sgd_direction(d, buf, hp)
        return hp.lr * n * direction, buf
    s = n.sqrt()
    direction, buf = _sgd_direction(s * d, buf, hp)
    return hp.lr * s * direction, buf


def row_ends(index: list[LayerIndex]) -> Tensor:
    """Per row of the chain (hidden nodes, then output rows): the output row where its tau chain ends."""
    R = max(idx.row_off + idx.n_out for idx in index)
    end = torch.arange(R, device=index[0].col_node.device)
    for idx in reversed(index):
        if idx.tau_rows is not None:
            end[idx.tau_nodes] = end[idx.row_off + idx.tau_rows]
    return end


def chain_factors(weights: list[Tensor], B: list[Tensor], index: list[LayerIndex], s2: set[int]) -> Tensor:
    """``n`` of every row of the chain: ``n_k`` of the S2 row where its tau chain ends, else 1."""
    R = max(idx.row_off + idx.n_out for idx in index)
    n_rows = torch.ones(R, dtype=weights[0].dtype, device=weights[0].device)
    for l in s2:
        assert not index[l].hidden, "S2 rows are output rows of their segment"
        n_rows[index[l].rows] = (weights[l] * B[l].view(1, -1, 1)).square().sum((1, 2))
    return n_rows[row_ends(index)]


def bn_chain_step(
    weights, grads, biases, bias_grads, wbufs, bbufs, index, hp, s2: set[int], min_ratio, buffer, tied=()
):
    """One step on a chain (lists per layer, as ``gsgd_chain_step``); returns new weights, biases,
    buffers and the guard's hits. ``tied``: ``(layer, value, gradient, buffer)`` of each tied
    parameter, a hidden bias of that layer: its new value and buffer are appended to ``new_b`` and
    ``new_bbuf`` (after the ``L`` layers' entries)."""
    L = len(weights)
    B, F = chain_backbone(weights, index)
    # the tied parameters are hidden biases of their layer: stacked with its bias for the row sums
    stack_b, stack_g = list(biases), list(bias_grads)
    for k, t, gt, _ in tied:
        stack_b[k] = torch.cat([stack_b[k].view(-1, t.numel()), t.view(1, -1)])
        stack_g[k] = torch.cat([stack_g[k].view(-1, t.numel()), gt.view(1, -1)])
    gamma = chain_gamma(weights, grads, stack_b, stack_g, index)
    n_all = chain_factors(weights, B, index, s2)
    R = n_all.numel()
    F_new = torch.ones(R, dtype=weights[0].dtype)
    new_w, new_b, new_wbuf, new_bbuf = [None] * L, [None] * L, [None] * L, [None] * L
    tied_new, tied_buf = [None] * len(tied), [None] * len(tied)
    hits = 0
    for l in range(L - 1, -1, -1):
        w, g, idx = weights[l], grads[l], index[l]
        bcol, frow = B[l].view(1, -1, 1), F[l].view(-1, 1, 1)
        n = n_all[idx.rows]
        v, p = w * bcol * frow, g / (bcol * frow)
        if idx.tau_rows is not None:
            tau = (idx.tau_rows, idx.tau_cols, idx.centre)
            p[tau] -= gamma[idx.tau_nodes] / v[tau]
        delta, new_wbuf[l] = _move(v, p, n.view(-1, 1, 1), wbufs[l], hp, buffer)
        v_new = v - delta
        if idx.tau_rows is not None:
            tau = (idx.tau_rows, idx.tau_cols, idx.centre)
            old, new = v[tau], v_new[tau]
            hit = idx.tau_free & ~(new / old >= min_ratio)
            hits += int(hit.sum())
            v_new[tau] = torch.where(hit, old * min_ratio, new)
        f_new = F_new[idx.rows].view(-1, 1, 1)
        w_new = (w + (v_new - v) / (bcol * frow)) * (frow / f_new)
        if idx.sig_rows is not None:
            w_new[idx.sig_rows, idx.sig_cols, idx.centre] = sigma_entries(w, idx)
            if new_wbuf[l] is not None:
                new_wbuf[l][idx.sig_rows, idx.sig_cols, idx.centre] = 0
        new_w[l] = w_new
        if biases[l] is not None and idx.hidden:
            vb = biases[l] * F[l]
            delta, new_bbuf[l] = _move(vb, bias_grads[l] / F[l], n, bbufs[l], hp, buffer)
            new_b[l] = (biases[l] - delta / F[l]) * (F[l] / f_new.view(-1))
        for i, (k, t, gt, tb) in enumerate(tied):
            if k == l:
                delta, tied_buf[i] = _move(t * F[l], gt / F[l], n, tb, hp, buffer)
                tied_new[i] = (t - delta / F[l]) * (F[l] / f_new.view(-1))
        if idx.tau_rows is not None:
            F_new[idx.tau_nodes] = tau_entries(w_new, idx) * F_new[idx.row_off + idx.tau_rows]
    return new_w, new_b + tied_new, new_wbuf, new_bbuf + tied_buf, hits


class ReferenceBnSGD:
    """The step above on a whole model: chains, lone S2 layers, and torch's SGD for the rest.

    One parameter group; ``step()`` reads ``.grad`` and writes the parameters in place.
    """

    def __init__(self, model: nn.Module, spec: BnSpec, *, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, min_ratio: float = 0.01,
                 buffer: str = "normalized", s2: bool = True) -> None:  # fmt: skip
        self.model, self.spec = model, spec
        self.hp = Hyper(lr, momentum, dampening, weight_decay, nesterov)
        self.min_ratio, self.buffer = min_ratio, buffer
        self.s2_ids = {id(layer.weight) for layer in spec.s2} if s2 else set()
        self.bufs: dict[int, Tensor | None] = {}
        self.guard_hits = 0

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)

    @torch.no_grad()
    def step(self) -> None:
        done: set[int] = set()
        for chain in self.spec.topology.chains:
            index = chain_index(chain)
            ls = chain.layers
            ws = [layer.weight3d() for layer in ls]
            gs = [layer.weight3d(layer.weight.grad) for layer in ls]
            bs = [layer.bias for layer in ls]
            gbs = [None if b is None else b.grad for b in bs]
            s2 = {l for l, layer in enumerate(ls) if id(layer.weight) in self.s2_ids}
            wb = [self.bufs.get(id(layer.weight)) for layer in ls]
            bb = [None if b is None else self.bufs.get(id(b)) for b in bs]
            tied = [(l, t, t.grad, self.bufs.get(id(t))) for l, layer in enumerate(ls) for t in layer.tied]
            out = bn_chain_step(ws, gs, bs, gbs, wb, bb, index, self.hp, s2, self.min_ratio, self.buffer, tied)
            new_w, new_b, new_wbuf, new_bbuf, hits = out
            for (_, t, _, _), nt, ntb in zip(tied, new_b[len(ls) :], new_bbuf[len(ls) :]):
                t.copy_(nt)
                self.bufs[id(t)] = ntb
                done.add(id(t))
            self.guard_hits += hits
            for l, layer in enumerate(ls):
                ws[l].copy_(new_w[l])
                self.bufs[id(layer.weight)] = new_wbuf[l]
                done.add(id(layer.weight))
                if new_b[l] is not None:
                    layer.bias.copy_(new_b[l])
                    self.bufs[id(layer.bias)] = new_bbuf[l]
                    done.add(id(layer.bias))
        for layer in self.spec.s2:
            if id(layer.weight) in done or id(layer.weight) not in self.s2_ids:
                continue
            w, g = layer.weight3d(), layer.weight3d(layer.weight.grad)
            n = w.square().sum((1, 2), keepdim=True)
            delta, self.bufs[id(layer.weight)] = _move(w, g, n, self.bufs.get(id(layer.weight)), self.hp, self.buffer)
            w.sub_(delta)
            done.add(id(layer.weight))
        for p in self.model.parameters():  # torch.optim.SGD's rule
            if id(p) in done or p.grad is None:
                continue
            d = p.grad + self.hp.weight_decay * p if self.hp.weight_decay != 0 else p.grad
            direction, self.bufs[id(p)] = _sgd_direction(d, self.bufs.get(id(p)), self.hp)
            p.sub_(self.hp.lr * direction)
