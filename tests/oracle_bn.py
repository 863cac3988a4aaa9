"""Brute-force oracle of G-SGD for BatchNorm segments (docs/math.md, "BatchNorm segments: S1 and S2").

The definition, not the formulas of tests/reference_bn.py: parameterize every chain by its
basis-path values (tests/oracle_dag.py; a BatchNorm affine is a chain layer with one outside
column), take ``torch.optim.SGD``'s step on them (momentum, Nesterov, dampening and weight decay as
torch has them, on path values), and after every step move each S2 block back onto its slice
``n_k = 1`` by an S2 rescaling, which changes nothing in the training-mode function:

* the S2 block of row ``k`` (of a layer whose rows feed a training-mode BatchNorm) is every basis
  path that ends at ``k``: the edges into ``k``, and the edges into (and the bias of) every hidden
  node whose tau chain ends at ``k``;
* ``n_k`` is the sum of squares of the path values of the edges into ``k``; a layer alone (outside
  any chain) has ``B = F = 1``, so its path values are its weights and ``n_k = ||W[k]||^2``.

The retraction leaves torch's momentum buffers as they are. Float64 throughout; the end of every tau
chain is found by the oracle's own loops (``DagBasis.tau``).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from lightning_gsgd import init_skeleton_
from tests.bn_models import BnSpec, make_bn
from tests.oracle_dag import DagBasis, DagPathParameterization, rescale_dag_units_


def _ends(basis: DagBasis) -> dict[tuple[int, int], tuple[int, int]]:
    """Per node ``(layer, row)``: the ``(output layer, row)`` where its tau chain ends."""
    out: dict[tuple[int, int], tuple[int, int]] = {}
    for l in range(len(basis.chain.layers) - 1, -1, -1):
        for b in range(basis.chain.layers[l].n_out):
            if basis.hidden[l]:
                k, r, _ = basis.tau[(l, b)]
                out[(l, b)] = out[(k, r)]
            else:
                out[(l, b)] = (l, b)
    return out


class BnOracle:
    """torch's SGD on path values, then each S2 block retracted onto its slice ``n_k = 1`` (or another
    torch optimizer, ``optimizer=torch.optim.Adam``: G-space Adam's definition on the slice)."""

    def __init__(self, model: nn.Module, spec: BnSpec, optimizer: type = torch.optim.SGD, **sgd) -> None:
        self.model = model
        self.pp = DagPathParameterization(model, spec.topology)
        s2_ids = {id(layer.weight) for layer in spec.s2}
        names = {id(p): n for n, p in model.named_parameters()}
        # per S2 row: (norm leaf, row) and the (leaf, index) of every coordinate of its block
        self.blocks: list[tuple[Tensor, int, list[tuple[Tensor, tuple]]]] = []
        in_chain = set()
        for basis, vw, vb, _, _, vt in self.pp.chains:
            ends = _ends(basis)
            for l, layer in enumerate(basis.chain.layers):
                in_chain.add(id(layer.weight))
                if basis.hidden[l] or id(layer.weight) not in s2_ids:
                    continue
                for k in range(layer.n_out):
                    members = [(vw[l], (k,))]
                    for (m, b), end in ends.items():
                        if end == (l, k) and basis.hidden[m]:
                            members.append((vw[m], (b,)))  # sigma entries are no coordinates: never moved
                            if vb[m] is not None:
                                members.append((vb[m], (b,)))
                            members += [(v, (b,)) for v in vt[m]]
                    self.blocks.append((vw[l], k, members))
        for layer in spec.s2:
            if id(layer.weight) not in in_chain:  # a layer alone: its path values are its weights
                leaf = self.pp.plain[names[id(layer.weight)]]
                self.blocks += [(leaf, k, [(leaf, (k,))]) for k in range(layer.n_out)]
        self.retract()
        self.opt = optimizer(self.pp.leaves, **sgd)

    @torch.no_grad()
    def retract(self) -> None:
        """The S2 rescaling that puts every block on its slice ``n_k = 1`` (norms read first)."""
        scales = [block[0][block[1]].square().sum().rsqrt() for block in self.blocks]
        for (_, _, members), s in zip(self.blocks, scales):
            for leaf, at in members:
                leaf[at] *= s

    def step(self, loss_fn, x: Tensor) -> None:
        self.opt.zero_grad()
        loss_fn(self.pp.forward(x)).backward()
        self.opt.step()
        self.retract()

    def weights(self) -> dict[str, Tensor]:
        return {k: v.detach() for k, v in self.pp.weights().items()}


def normalized_path_values(model: nn.Module, spec: BnSpec) -> list[Tensor]:
    """The gauge-free reading of ``model``: every chain's path values (sigma entries included, as
    ``w B F``), every lone S2 layer's weights, each S2 block divided by ``sqrt(n_k)``, and the
    parameters outside the chains as they are."""
    return [leaf.detach().clone() for leaf in BnOracle(model, spec).pp.leaves]


def oracle_run(
    model: nn.Module, spec: BnSpec, x: Tensor, loss_fn, steps: int, optimizer: type = torch.optim.SGD, **sgd
) -> dict[str, Tensor]:
    """The weights after ``steps`` oracle steps from ``model``'s (the model is not changed)."""
    oracle = BnOracle(model, spec, optimizer, **sgd)
    for _ in range(steps):
        oracle.step(loss_fn, x)
    return oracle.weights()


@torch.no_grad()
def rescale_bn_(spec: BnSpec, spread: float, seed: int, s1: bool = True, s2: bool = True) -> None:
    """Random S1 and/or S2 factors ``exp(U(-spread, spread))``: S1 on every hidden unit of every chain
    (BatchNorm affines included: ``gamma``, ``beta`` times ``c``, the columns that read the unit
    divided by ``c``), S2 on every row of every S2 layer (the row and its bias times ``c``)."""
    if s1:
        rescale_dag_units_(spec.topology, spread, seed)
    if s2:
        gen = torch.Generator().manual_seed(seed + 1)
        for layer in spec.s2:
            c = torch.exp((2 * torch.rand(layer.n_out, generator=gen, dtype=torch.float64) - 1) * spread)
            layer.weight3d().mul_(c.view(-1, 1, 1))
            if layer.bias is not None:
                layer.bias.mul_(c)


def assert_matches_oracle(ours: nn.Module, model: nn.Module, x: Tensor, y: Tensor, steps: int, **sgd) -> None:
    """``ours`` (``model`` after ``steps`` steps of the step under test, squared error to ``y``) equals
    the oracle's run from ``model``: the same training-mode function and normalized path values, to
    1e-10 (the oracle's weights are its retracted ones: compared through these invariants). The step
    must have moved the function, or the comparison would be vacuous."""
    theirs = copy.deepcopy(model)
    theirs.load_state_dict(
        oracle_run(model, model.spec(), x, lambda o: ((o - y) ** 2).mean(), steps, **sgd), strict=False
    )

    assert rel(ours(x), model(x)) > 1e-3, "the step did nothing: the comparison would be vacuous"
    assert rel(ours(x), theirs(x)) <= 1e-10
    for a, b in zip(normalized_path_values(ours, ours.spec()), normalized_path_values(theirs, theirs.spec())):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12 * b.abs().max())


def setup_bn(name: str, rescaled: bool = False) -> tuple[nn.Module, Tensor, Tensor]:
    """Model ``name`` of tests/bn_models.py with its skeleton at 1 (gamma included), optionally S1- and
    S2-rescaled (B != 1, rows of any norm); its input and a regression target."""
    model, x = make_bn(name)
    init_skeleton_(model.spec().topology)
    if rescaled:
        rescale_bn_(model.spec(), spread=0.5, seed=7)
    y = torch.randn(model(x).shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return model, x, y


def train(model: nn.Module, x: Tensor, y: Tensor, make, steps: int = 5):
    """``steps`` steps of the optimizer ``make(model)`` on the squared error to ``y``; the optimizer."""
    opt = make(model)
    for _ in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    return opt


def rel(a: Tensor, b: Tensor) -> float:
    """``max|a - b| / max|b|``."""
    return ((a - b).abs().max() / b.abs().max()).item()
