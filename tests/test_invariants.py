"""Acceptance 3: the count m - H, the balance identity, lr = 0 is a no-op, sigma weights stay fixed,
and parameters outside every chain get exactly ``torch.optim.SGD``.

Everything the tests compare against is derived here from the model's modules and from
``shared/design/gsgd-math.md``, not from the library's index tensors.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn

from lightning_gsgd import GSGD, detect_topology, init_skeleton_, random_unit_factors, rescale_hidden_units_
from tests.models import MODELS, make, mixed, tiny_cnn, tiny_mlp

# ----------------------------------------------------------------------------- (a) the count m - H


class _Columns:
    """Column numbers of the scalar parameters (weight entries and hidden biases) of a net."""

    def __init__(self) -> None:
        self.n = 0
        self.base: dict[str, int] = {}
        self.shape: dict[str, tuple[int, ...]] = {}

    def add(self, name: str, shape: tuple[int, ...]) -> None:
        self.base[name] = self.n
        self.shape[name] = shape
        self.n += math.prod(shape)

    def __call__(self, name: str, *index: int) -> int:
        flat = 0
        for i, s in zip(index, self.shape[name]):
            flat = flat * s + i
        return self.base[name] + flat


def _rank(paths: list[tuple[int, ...]], cols: _Columns) -> int:
    """Rank of d log|path value| / d log|w|: the 0/1 path-edge incidence matrix (a path's log value
    is the sum of the log magnitudes of its edges)."""
    jac = torch.zeros(len(paths), cols.n, dtype=torch.float64)
    for r, edges in enumerate(paths):
        for c in edges:
            jac[r, c] += 1.0
    return int(torch.linalg.matrix_rank(jac))


def _mlp_paths(widths: list[int], hidden_bias: bool) -> tuple[list[tuple[int, ...]], _Columns]:
    """Every input->output path of an MLP, and every path that starts at a hidden bias (an edge from a
    constant node). The output bias is a path of its own, already invariant, and is not counted."""
    L = len(widths) - 1
    cols = _Columns()
    for l in range(L):
        cols.add(f"w{l}", (widths[l + 1], widths[l]))
        if hidden_bias and l < L - 1:
            cols.add(f"b{l}", (widths[l + 1],))
    paths = []
    for nodes in itertools.product(*(range(w) for w in widths)):
        paths.append(tuple(cols(f"w{l}", nodes[l + 1], nodes[l]) for l in range(L)))
    if hidden_bias:
        for l in range(L - 1):
            for nodes in itertools.product(*(range(w) for w in widths[l + 1 :])):
                edges = [cols(f"b{l}", nodes[0])]
                edges += [cols(f"w{k}", nodes[k - l], nodes[k - l - 1]) for k in range(l + 1, L)]
                paths.append(tuple(edges))
    return paths, cols


def _cnn_paths(hidden_bias: bool) -> tuple[list[tuple[int, ...]], _Columns]:
    """Every path of ``tiny_cnn`` unrolled over pixels, 5x5 input: conv 3x3 (2->3), conv 2x2 (3->2)
    on a 3x3 map, flatten of a 2x2 map in torch's channel-major order (f = c * 4 + pixel), Linear."""
    cols = _Columns()
    cols.add("conv1", (3, 2, 3, 3))
    if hidden_bias:
        cols.add("b1", (3,))
    cols.add("conv2", (2, 3, 2, 2))
    if hidden_bias:
        cols.add("b2", (2,))
    cols.add("lin", (2, 8))
    paths = []
    for k, c2, y2, x2, c1, dy2, dx2 in itertools.product(
        range(2), range(2), range(2), range(2), range(3), *[range(2)] * 2
    ):
        head = [cols("lin", k, c2 * 4 + y2 * 2 + x2), cols("conv2", c2, c1, dy2, dx2)]
        # conv2 output pixel (y2, x2) reads conv1 pixel (y2 + dy2, x2 + dx2); that pixel reads
        # input pixels through every 3x3 tap, all inside the 5x5 input.
        for c0, dy1, dx1 in itertools.product(range(2), range(3), range(3)):
            paths.append(tuple(head + [cols("conv1", c1, c0, dy1, dx1)]))
        if hidden_bias:
            paths.append(tuple(head + [cols("b1", c1)]))
    if hidden_bias:
        for k, c2, pix in itertools.product(range(2), range(2), range(4)):
            paths.append((cols("lin", k, c2 * 4 + pix), cols("b2", c2)))
    return paths, cols


@pytest.mark.parametrize("bias", [False, True])
def test_basis_path_count_mlp_brute_force(bias):
    paths, cols = _mlp_paths([3, 4, 5, 2], hidden_bias=bias)
    assert len(paths) == 3 * 4 * 5 * 2 + (4 * 5 * 2 + 5 * 2 if bias else 0)
    model = tiny_mlp(bias).double()
    topo = detect_topology(model, torch.randn(2, 3, dtype=torch.float64))
    assert len(topo.chains) == 1
    rank = _rank(paths, cols)
    assert rank == topo.chains[0].basis_paths == topo.basis_paths
    assert cols.n - rank == topo.hidden_units == 4 + 5


@pytest.mark.parametrize("bias", [False, True])
def test_basis_path_count_cnn_brute_force(bias):
    paths, cols = _cnn_paths(hidden_bias=bias)
    model = tiny_cnn(bias).double()
    topo = detect_topology(model, torch.randn(2, 2, 5, 5, dtype=torch.float64))
    assert len(topo.chains) == 1 and len(topo.chains[0].layers) == 3
    rank = _rank(paths, cols)
    assert rank == topo.basis_paths
    assert cols.n - rank == topo.hidden_units == 3 + 2


def test_sigma_tau_basis_spans_every_path():
    """The m - H paths P(e) = sigma-chain + e + tau-chain (rule of gsgd-math.md section 2, unequal
    widths, with hidden biases) are independent and span every path."""
    widths = [3, 4, 5, 2]
    L = len(widths) - 1
    paths, cols = _mlp_paths(widths, hidden_bias=True)

    def sigma_chain(l: int, a: int) -> list[int]:  # edges from the input to node a (input of layer l)
        if l == 0:
            return []
        src = a % widths[l - 1]
        return sigma_chain(l - 1, src) + [cols(f"w{l - 1}", a, src)]

    def tau_chain(l: int, b: int) -> list[int]:  # edges from node b (output of layer l) to the output
        if l == L - 1:
            return []
        dst = b % widths[l + 2]
        return [cols(f"w{l + 1}", dst, b)] + tau_chain(l + 1, dst)

    basis = []
    for l in range(L):
        for b, a in itertools.product(range(widths[l + 1]), range(widths[l])):
            if l < L - 1 and a == b % widths[l]:
                continue  # sigma edge: not a coordinate
            basis.append(tuple(sigma_chain(l, a) + [cols(f"w{l}", b, a)] + tau_chain(l, b)))
        if l < L - 1:
            for b in range(widths[l + 1]):
                basis.append(tuple([cols(f"b{l}", b)] + tau_chain(l, b)))
    rank_all = _rank(paths, cols)
    assert len(basis) == rank_all == _rank(basis, cols) == _rank(paths + basis, cols)


# ----------------------------------------------------------------------------- (b) balance identity


def _order_one_(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(
                (torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.5)
                * (torch.randint(0, 2, p.shape, generator=g) * 2 - 1)
            )


@pytest.mark.parametrize("name", list(MODELS))
def test_balance_identity_at_every_hidden_node(name):
    """sum of w * dL/dw over a hidden node's incoming edges (bias included) equals the sum over its
    outgoing edges, with the edges grouped by each layer's [n_out, n_in, taps] view."""
    model, x = make(name)
    _order_one_(model, 7)
    topo = detect_topology(model, x)
    out = model(x)
    target = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(8))
    ((out - target) ** 2).mean().backward()
    checked = 0
    for chain in topo.chains:
        for prev, nxt in zip(chain.layers[:-1], chain.layers[1:]):
            incoming = (prev.weight3d() * prev.weight3d(prev.weight.grad)).sum((1, 2))
            if prev.bias is not None:
                incoming = incoming + prev.bias * prev.bias.grad
            outgoing = (nxt.weight3d() * nxt.weight3d(nxt.weight.grad)).sum((0, 2))
            scale = incoming.detach().abs().max()
            assert scale > 1e-6, f"{prev.name}: vanishing gradients make the check vacuous"
            torch.testing.assert_close(incoming, outgoing, rtol=0, atol=1e-12 * float(scale), msg=prev.name)
            checked += prev.n_out
    assert checked == topo.hidden_units > 0


# ----------------------------------------------------------------------------- (c) lr = 0


def _init(model, topo, mode: str) -> None:
    if mode != "default":
        init_skeleton_(topo)
    if mode == "rescaled":  # sigma/tau weights off 1: B and F products differ from 1
        rescale_hidden_units_(topo, random_unit_factors(topo, 1.0, torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("init", ["default", "skeleton", "rescaled"])
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize(
    "hyper",
    [dict(), dict(momentum=0.9, weight_decay=0.1), dict(momentum=0.9, nesterov=True, weight_decay=0.01)],
    ids=["plain", "momentum_wd", "nesterov"],
)
def test_zero_lr_changes_nothing(name, init, hyper):
    model, x = make(name)
    topo = detect_topology(model, x)
    _init(model, topo, init)
    before = copy.deepcopy(model)
    opt = GSGD(model.parameters(), lr=0.0, topology=topo, **hyper)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    assert int(opt.steps) == 3
    if hyper:
        assert all("momentum_buffer" in opt.state[p] for p in model.parameters()), "the step did not run"
    for (n, p), q in zip(model.named_parameters(), before.parameters()):
        assert torch.equal(p, q), f"{n} changed with lr = 0"


# ----------------------------------------------------------------------------- (d) sigma weights fixed


def _expected_sigma(model: nn.Module, topo) -> dict[str, torch.Tensor]:
    """Boolean masks of the sigma weights, from the modules: edge (b <- b mod n_in) at the centre tap,
    in every chain layer but the last. Conv centre: (k // 2) in every kernel dim. A Linear reading a
    flattened map of n_in channels x P positions: tap P // 2 (the library's convention; any fixed
    tap gives a basis, gsgd-math.md leaves it open)."""
    masks = {}
    for chain in topo.chains:
        n_prev = None
        for layer in chain.layers[:-1]:
            mod = model.get_submodule(layer.name)
            w = mod.weight
            mask = torch.zeros(w.shape, dtype=torch.bool)
            if isinstance(mod, nn.Linear):
                n_in = mod.in_features if n_prev is None else n_prev
                taps = mod.in_features // n_in
                m3 = mask.view(mod.out_features, n_in, taps)
                for b in range(mod.out_features):
                    m3[b, b % n_in, taps // 2] = True
                n_prev = mod.out_features
            else:
                centre = tuple(k // 2 for k in mod.kernel_size)
                for b in range(mod.out_channels):
                    mask[(b, b % mod.in_channels, *centre)] = True
                n_prev = mod.out_channels
            masks[layer.name + ".weight"] = mask
    return masks


@pytest.mark.parametrize("name", list(MODELS))
def test_sigma_weights_stay_fixed_and_only_they(name):
    model, x = make(name)
    topo = detect_topology(model, x)
    _init(model, topo, "rescaled")
    # A unit that is dead on the whole batch has all its path values decay by one factor, which
    # leaves its incoming weights exactly unchanged: use a batch large enough that none is dead.
    x = torch.randn(256, *x.shape[1:], dtype=x.dtype, generator=torch.Generator().manual_seed(5))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = GSGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=0.01, topology=topo)
    for step in range(5):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        if step == 0:
            for chain in topo.chains:
                for layer in chain.layers[:-1]:
                    rows = layer.weight3d(layer.weight.grad).flatten(1).abs().sum(1)
                    assert bool((rows > 0).all()), f"{layer.name}: a unit is dead on the test batch"
        opt.step()
    assert int(opt.guard_hits) == 0
    sigma = _expected_sigma(model, topo)
    assert sum(int(m.sum()) for m in sigma.values()) == topo.hidden_units
    for n, p in model.named_parameters():
        unchanged = p == before[n]
        expected = sigma.get(n, torch.zeros_like(unchanged))
        # with weight decay on, every free coordinate moves: the fixed entries are exactly sigma
        assert torch.equal(unchanged, expected), f"{n}: fixed entries are not the sigma weights"


# ----------------------------------------------------------------------------- (e) plain SGD outside chains

# In tests.models.mixed: layers 4 (cut off by GELU and LayerNorm) and 5 (LayerNorm) are in no chain;
# 2 and 8 end their chains, so their biases are output biases.
OUTSIDE = ["2.bias", "4.weight", "4.bias", "5.weight", "5.bias", "8.bias"]


@pytest.mark.parametrize(
    "hyper",
    [
        dict(lr=0.1),
        dict(lr=0.1, momentum=0.9, weight_decay=0.01),
        dict(lr=0.05, momentum=0.5, dampening=0.3, weight_decay=0.1),
        dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    ],
)
def test_parameters_outside_chains_get_torch_sgd(hyper):
    torch.manual_seed(0)
    ours = mixed().double()
    ref = copy.deepcopy(ours)
    topo = detect_topology(ours, torch.randn(2, 4, dtype=torch.float64))
    covered = {n for n, p in ours.named_parameters() if any(p is q for q in topo.chain_params())}
    assert covered == {n for n, _ in ours.named_parameters()} - {"4.weight", "4.bias", "5.weight", "5.bias"}
    opt = GSGD(ours.parameters(), topology=topo, **hyper)
    sgd = torch.optim.SGD(ref.parameters(), **hyper)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        # the same gradients for both (a forward pass would differ once the chains have moved)
        for p, q in zip(ours.parameters(), ref.parameters()):
            p.grad = 0.1 * torch.randn(p.shape, dtype=p.dtype, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        sgd.step()
    named_ref = dict(ref.named_parameters())
    for n, p in ours.named_parameters():
        if n in OUTSIDE:
            assert torch.equal(p, named_ref[n]), n
            if "momentum" in hyper:
                assert torch.equal(opt.state[p]["momentum_buffer"], sgd.state[named_ref[n]]["momentum_buffer"]), n
        else:
            assert not torch.equal(p, named_ref[n]), f"{n}: a chain weight got plain SGD"
