"""Brute-force G-SGD oracle for DAG chains, written independently of ``lightning_gsgd.topology.index``.

Only ``Chain.sources`` and the layers' shapes are read from the library. The basis follows the rule
of docs/math.md, "DAG chains" (sigma: row ``b`` of a hidden layer from its column ``b mod n_in``;
tau: a hidden node's first column in the first layer that reads it, row ``column mod n_out``; both
at the centre tap), found here with plain Python loops over nodes and columns. The net is
re-parameterized by its basis-path values, the loss differentiated with autograd with respect to
them, stepped with a torch optimizer (so momentum and weight decay act on path values), and mapped
back to weights with every sigma weight fixed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_gsgd import Topology
from lightning_gsgd.topology.types import Chain


class DagBasis:
    """The sigma/tau edges of one chain, by loops (the oracle's own reading of ``sources``)."""

    def __init__(self, chain: Chain) -> None:
        self.chain = chain
        L = len(chain.layers)
        # per layer, per column: (producer layer, node) or None (from outside the chain)
        self.cols: list[list[tuple[int, int] | None]] = []
        for srcs in chain.sources:
            cols: list[tuple[int, int] | None] = []
            for s in srcs:
                cols += [None if s.layer < 0 else (s.layer, n) for n in s.nodes]
            self.cols.append(cols)
        self.hidden = [any(c is not None and c[0] == l for cols in self.cols for c in cols) for l in range(L)]
        self.tau: dict[tuple[int, int], tuple[int, int, int]] = {}  # node -> (layer, row, column)
        for l in range(L):
            for c, src in enumerate(self.cols[l]):
                if src is not None and src not in self.tau:
                    self.tau[src] = (l, c % chain.layers[l].n_out, c)

    def sigma_col(self, l: int, b: int) -> int:
        return b % self.chain.layers[l].n_in

    def is_sigma(self, l: int, r: int, c: int, t: int) -> bool:
        layer = self.chain.layers[l]
        return self.hidden[l] and t == layer.centre and c == self.sigma_col(l, r)

    def B(self, ws: list[Tensor], l: int, c: int) -> Tensor:
        """Product of sigma weights from the chain's input to the node in column ``c`` of layer ``l``."""
        src = self.cols[l][c]
        if src is None:
            return torch.ones((), dtype=ws[0].dtype)
        k, a = src
        sc = self.sigma_col(k, a)
        return ws[k][a, sc, self.chain.layers[k].centre] * self.B(ws, k, sc)

    def F(self, ws: list[Tensor], l: int, b: int) -> Tensor:
        """Product of tau weights from node ``b`` of layer ``l`` to an output."""
        if not self.hidden[l]:
            return torch.ones((), dtype=ws[0].dtype)
        k, r, c = self.tau[(l, b)]
        return ws[k][r, c, self.chain.layers[k].centre] * self.F(ws, k, r)


def _path_values(basis: DagBasis) -> tuple[list[Tensor], list[Tensor | None], list[list[Tensor]]]:
    """Path values of every weight, hidden bias and tied parameter (one edge per node from outside:
    ``v = x F(b)``, as a hidden bias)."""
    chain = basis.chain
    ws = [layer.weight3d().detach() for layer in chain.layers]
    vw, vb, vt = [], [], []
    for l, layer in enumerate(chain.layers):
        v = torch.empty_like(ws[l])
        for i in range(layer.n_out):
            f = basis.F(ws, l, i)
            for j in range(layer.n_in):
                v[i, j, :] = ws[l][i, j, :] * basis.B(ws, l, j) * f
        vw.append(v)
        if layer.bias is not None and basis.hidden[l]:
            vb.append(torch.stack([layer.bias.detach()[i] * basis.F(ws, l, i) for i in range(layer.n_out)]))
        else:
            vb.append(None)
        f_rows = [basis.F(ws, l, i) for i in range(layer.n_out)]
        vt.append([torch.stack([t.detach()[i] * f_rows[i] for i in range(layer.n_out)]) for t in layer.tied])
    return vw, vb, vt


def _weights(basis: DagBasis, vw: list[Tensor], vb: list[Tensor | None], vt: list[list[Tensor]], sigma_w: list[Tensor]):
    """Weights, biases and tied parameters from path values (sigma gauge), differentiably, from the
    last layer back."""
    chain = basis.chain
    L = len(chain.layers)
    ws: list[Tensor] = list(sigma_w)
    bs: list[Tensor | None] = [None] * L
    ts: list[list[Tensor]] = [[] for _ in range(L)]
    for l in range(L - 1, -1, -1):
        layer = chain.layers[l]
        mask = torch.zeros(layer.n_out, layer.n_in, layer.taps, dtype=torch.bool)
        for b in range(layer.n_out):
            if basis.hidden[l]:
                mask[b, basis.sigma_col(l, b), layer.centre] = True
        # F' of this layer's rows uses only later layers, already rebuilt in ws
        f_new = torch.stack([basis.F(ws, l, i) for i in range(layer.n_out)]).view(-1, 1, 1)
        b_in = torch.stack([basis.B(sigma_w, l, j) for j in range(layer.n_in)]).view(1, -1, 1)
        ws[l] = torch.where(mask, sigma_w[l], vw[l] / (b_in * f_new))
        if vb[l] is not None:
            bs[l] = vb[l] / f_new.view(-1)
        ts[l] = [v / f_new.view(-1) for v in vt[l]]
    return ws, bs, ts


class DagPathParameterization:
    """Leaf tensors for path values (and plain parameters), and the model's weights as their function."""

    def __init__(self, model: nn.Module, topology: Topology) -> None:
        self.model = model
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.leaves: list[Tensor] = []
        self.chains: list[Any] = []
        chain_ids = set()
        for chain in topology.chains:
            basis = DagBasis(chain)
            vw, vb, vt = _path_values(basis)
            vw = [v.clone().requires_grad_(True) for v in vw]
            vb = [None if v is None else v.clone().requires_grad_(True) for v in vb]
            vt = [[v.clone().requires_grad_(True) for v in vs] for vs in vt]
            sigma_w = [layer.weight3d().detach().clone() for layer in chain.layers]
            out_b = [
                None if layer.bias is None or basis.hidden[l] else layer.bias.detach().clone().requires_grad_(True)
                for l, layer in enumerate(chain.layers)
            ]
            self.chains.append((basis, vw, vb, sigma_w, out_b, vt))
            self.leaves += vw + [v for v in vb if v is not None] + [b for b in out_b if b is not None]
            self.leaves += [v for vs in vt for v in vs]
            for layer in chain.layers:
                chain_ids.update(id(p) for p in layer.params())
        self.plain = {
            n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters() if id(p) not in chain_ids
        }
        self.leaves += list(self.plain.values())

    def named_leaves(self) -> dict[str, Tensor]:
        """The leaf that stands for each model parameter (for param groups)."""
        out = dict(self.plain)
        for basis, vw, vb, _, out_b, vt in self.chains:
            for l, layer in enumerate(basis.chain.layers):
                out[self.names[id(layer.weight)]] = vw[l]
                if layer.bias is not None:
                    out[self.names[id(layer.bias)]] = vb[l] if basis.hidden[l] else out_b[l]
                out.update({self.names[id(t)]: v for t, v in zip(layer.tied, vt[l])})
        return out

    def weights(self) -> dict[str, Tensor]:
        out = dict(self.plain)
        for basis, vw, vb, sigma_w, out_b, vt in self.chains:
            ws, bs, ts = _weights(basis, vw, vb, vt, sigma_w)
            for l, layer in enumerate(basis.chain.layers):
                out[self.names[id(layer.weight)]] = ws[l].reshape(layer.weight.shape)
                if layer.bias is not None:
                    out[self.names[id(layer.bias)]] = bs[l] if basis.hidden[l] else out_b[l]
                out.update({self.names[id(t)]: v for t, v in zip(layer.tied, ts[l])})
        return out

    def forward(self, x: Tensor) -> Tensor:
        return functional_call(self.model, self.weights(), (x,))


def dag_oracle_run(model, topology, x, loss_fn, steps: int, optimizer=torch.optim.SGD, **kwargs) -> dict[str, Tensor]:
    """Run ``steps`` steps of ``optimizer`` on the path values; return the resulting weights (detached)."""
    pp = DagPathParameterization(model, topology)
    opt = optimizer(pp.leaves, **kwargs)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(pp.forward(x)).backward()
        opt.step()
    return {k: v.detach() for k, v in pp.weights().items()}


@torch.no_grad()
def rescale_dag_units_(topology: Topology, spread: float, seed: int) -> None:
    """A random positive scaling of every hidden node, by loops over the sources (the oracle's own):
    row ``b`` of a hidden layer (and its bias) times ``c``, every column that reads it divided by ``c``."""
    gen = torch.Generator().manual_seed(seed)
    for chain in topology.chains:
        basis = DagBasis(chain)
        factors = {}
        for l, layer in enumerate(chain.layers):
            if basis.hidden[l]:
                u = torch.rand(layer.n_out, generator=gen, dtype=torch.float64)
                factors[l] = torch.exp((2 * u - 1) * spread)
        for l, layer in enumerate(chain.layers):
            w3 = layer.weight3d()
            if l in factors:
                w3.mul_(factors[l].to(w3).view(-1, 1, 1))
                if layer.bias is not None:
                    layer.bias.mul_(factors[l].to(w3))
                for t in layer.tied:  # the BatchNorms that add into the same channels scale with them
                    t.mul_(factors[l].to(w3))
            for c, src in enumerate(basis.cols[l]):
                if src is not None:
                    w3[:, c, :] /= factors[src[0]][src[1]].to(w3)
