"""Brute-force G-SGD oracle, written independently of ``lightning_gsgd.functional``.

The net is re-parameterized by its basis-path values (gsgd-math.md section 2) with plain Python
recursion over nodes; the loss is differentiated with autograd w.r.t. those values, stepped with
``torch.optim.SGD`` (so momentum and weight decay act on path values), and mapped back to weights
holding the sigma weights fixed. Only the layer metadata (n_out, n_in, taps, centre) is shared with
the library; it is checked separately (balance identity, self-check, rank test).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_gsgd import Topology


def _sigma_src(l: int, b: int, chain) -> int:
    return b % chain.layers[l].n_in


def _tau_dst(l: int, a: int, chain) -> int:
    # tau edge of node a (output of layer l) lives in layer l + 1
    return a % chain.layers[l + 1].n_out


def _B(ws: list[Tensor], chain, l: int, a: int) -> Tensor:
    """Product of sigma weights from the input to node a, which is an *input* node of layer l."""
    if l == 0:
        return torch.ones((), dtype=torch.float64)
    src = _sigma_src(l - 1, a, chain)
    c = chain.layers[l - 1].centre
    return ws[l - 1][a, src, c] * _B(ws, chain, l - 1, src)


def _F(ws: list[Tensor], chain, l: int, b: int) -> Tensor:
    """Product of tau weights from node b, an *output* node of layer l, to the chain's output."""
    if l == len(chain.layers) - 1:
        return torch.ones((), dtype=torch.float64)
    dst = _tau_dst(l, b, chain)
    c = chain.layers[l + 1].centre
    return ws[l + 1][dst, b, c] * _F(ws, chain, l + 1, dst)


def sigma_mask(chain, l: int) -> Tensor:
    layer = chain.layers[l]
    m = torch.zeros(layer.n_out, layer.n_in, layer.taps, dtype=torch.bool)
    if l < len(chain.layers) - 1:
        for b in range(layer.n_out):
            m[b, _sigma_src(l, b, chain), layer.centre] = True
    return m


def path_values(chain) -> tuple[list[Tensor], list[Tensor | None]]:
    """v for every weight entry (sigma entries included, not coordinates) and hidden bias."""
    ws = [layer.weight3d().detach() for layer in chain.layers]
    vw, vb = [], []
    for l, layer in enumerate(chain.layers):
        v = torch.empty_like(ws[l])
        for i in range(layer.n_out):
            f = _F(ws, chain, l, i)
            for j in range(layer.n_in):
                v[i, j, :] = ws[l][i, j, :] * _B(ws, chain, l, j) * f
        vw.append(v)
        hidden = l < len(chain.layers) - 1
        if layer.bias is not None and hidden:
            vb.append(torch.stack([layer.bias.detach()[i] * _F(ws, chain, l, i) for i in range(layer.n_out)]))
        else:
            vb.append(None)
    return vw, vb


def weights_from_values(chain, vw: list[Tensor], vb: list[Tensor | None], sigma_w: list[Tensor]):
    """Map path values back to weights (sigma gauge), differentiably. Returns 3-D weights, biases."""
    L = len(chain.layers)
    ws: list[Tensor] = [None] * L  # type: ignore[list-item]
    bs: list[Tensor | None] = [None] * L
    for l in range(L - 1, -1, -1):
        layer = chain.layers[l]
        mask = sigma_mask(chain, l)
        # F' of this layer's outputs, from the already rebuilt later layers
        f_new = torch.stack([_F(ws, chain, l, i) for i in range(layer.n_out)]).view(-1, 1, 1)
        b_in = torch.stack([_B(sigma_w, chain, l, j) for j in range(layer.n_in)]).view(1, -1, 1)
        ws[l] = torch.where(mask, sigma_w[l], vw[l] / (b_in * f_new))
        if vb[l] is not None:
            bs[l] = vb[l] / f_new.view(-1)
    return ws, bs


class PathParameterization:
    """Leaf tensors for path values (and plain parameters), and the model's weights as their function."""

    def __init__(self, model: nn.Module, topology: Topology) -> None:
        self.model = model
        self.topology = topology
        names = {id(p): n for n, p in model.named_parameters()}
        self.names = names
        self.leaves: list[Tensor] = []
        self.chain_leaves = []
        chain_ids = set()
        for chain in topology.chains:
            vw, vb = path_values(chain)
            vw = [v.clone().requires_grad_(True) for v in vw]
            vb = [None if v is None else v.clone().requires_grad_(True) for v in vb]
            sigma_w = [layer.weight3d().detach().clone() for layer in chain.layers]
            out_bias = chain.layers[-1].bias
            ob = None if out_bias is None else out_bias.detach().clone().requires_grad_(True)
            self.chain_leaves.append((chain, vw, vb, sigma_w, ob))
            self.leaves += vw + [v for v in vb if v is not None] + ([ob] if ob is not None else [])
            for layer in chain.layers:
                chain_ids.add(id(layer.weight))
                if layer.bias is not None:
                    chain_ids.add(id(layer.bias))
        self.plain = {
            n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters() if id(p) not in chain_ids
        }
        self.leaves += list(self.plain.values())

    def named_leaves(self) -> dict[str, Tensor]:
        """The leaf that stands for each model parameter: the path values of a chain weight or hidden
        bias, the plain copy of anything else (output biases included). Use it to build param groups."""
        out = dict(self.plain)
        for chain, vw, vb, _, ob in self.chain_leaves:
            for l, layer in enumerate(chain.layers):
                out[self.names[id(layer.weight)]] = vw[l]
                if layer.bias is not None:
                    out[self.names[id(layer.bias)]] = vb[l] if l < len(chain.layers) - 1 else ob
        return out

    def weights(self) -> dict[str, Tensor]:
        out = dict(self.plain)
        for chain, vw, vb, sigma_w, ob in self.chain_leaves:
            ws, bs = weights_from_values(chain, vw, vb, sigma_w)
            for l, layer in enumerate(chain.layers):
                out[self.names[id(layer.weight)]] = ws[l].reshape(layer.weight.shape)
                if layer.bias is not None:
                    b = bs[l] if l < len(chain.layers) - 1 else ob
                    out[self.names[id(layer.bias)]] = b
        return out

    def forward(self, x: Tensor) -> Tensor:
        return functional_call(self.model, self.weights(), (x,))


def oracle_run(model, topology, x, loss_fn, steps: int, **sgd_kwargs) -> dict[str, Tensor]:
    """Run ``steps`` SGD steps on path values; return the resulting weights (detached)."""
    pp = PathParameterization(model, topology)
    opt = torch.optim.SGD(pp.leaves, **sgd_kwargs)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(pp.forward(x)).backward()
        opt.step()
    return {k: v.detach() for k, v in pp.weights().items()}


def run_against_oracle(name: str, init: str, hyper: dict, steps: int, make_optimizer) -> torch.optim.Optimizer:
    """Train ``tests.models`` model ``name`` for ``steps`` steps with ``make_optimizer(params, topology,
    **hyper)`` and assert that it matches :func:`oracle_run` (outputs and every parameter, rel 1e-10).

    Returns the optimizer (the caller checks its own extras). With ``init == "order_one"`` the lr is
    scaled by 1e-2: large weights give large path gradients, and a smaller step keeps the guard, which
    the oracle does not model, out of play.
    """
    import copy

    from lightning_gsgd import detect_topology
    from tests.models import initialize, make

    model, x = make(name)
    topo = detect_topology(model, x)
    initialize(model, topo, init)
    if init == "order_one":
        hyper = dict(hyper, lr=hyper["lr"] * 1e-2)
    y = torch.randn(x.shape[0], model(x).shape[1], dtype=x.dtype, generator=torch.Generator().manual_seed(1))

    def loss_fn(out):
        return ((out - y) ** 2).mean()

    ours = copy.deepcopy(model)
    opt = make_optimizer(ours.parameters(), detect_topology(ours, x), **hyper)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(ours(x)).backward()
        opt.step()
    assert int(opt.guard_hits) == 0, "guard acted: the oracle does not model it"

    ref = oracle_run(model, topo, x, loss_fn, steps=steps, **hyper)
    out_ref = functional_call(model, ref, (x,))
    moved = (out_ref - model(x)).abs().max()
    assert moved > 1e-6, "the step did nothing: the comparison would be vacuous"
    rel = (ours(x) - out_ref).abs().max() / out_ref.abs().max()
    assert rel <= 1e-10
    # same path values, layer by layer (sigma gauge on both sides, so same weights too)
    for n, p in ours.named_parameters():
        assert torch.allclose(p, ref[n], rtol=1e-10, atol=1e-12 * ref[n].abs().max()), n
    return opt
