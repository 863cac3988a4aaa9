"""The mathematics of exact G-SGD for BatchNorm networks (docs/math.md, "BatchNorm segments: S1 and
S2"), held by a brute-force oracle and a reference step; the library's engine is used only for what
it already does (S1: a BatchNorm affine as a chain's first layer).

Models and their segments: tests/bn_models.py (float64, BatchNorm eps = 1e-30, training mode).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_gsgd import GSGD, detect_topology
from lightning_gsgd.step.graph import ChainGraphs
from tests.bn_models import BN_MODELS
from tests.oracle_bn import assert_matches_oracle, rel, rescale_bn_, setup_bn, train
from tests.oracle_dag import DagBasis, _path_values, dag_oracle_run
from tests.reference_bn import ReferenceBnSGD

NAMES = list(BN_MODELS)
HP = dict(lr=0.02, momentum=0.9, weight_decay=0.01)


def _twin(model, s1: bool, s2: bool):
    twin = copy.deepcopy(model)
    rescale_bn_(twin.spec(), spread=1.0, seed=5, s1=s1, s2=s2)
    return twin


def _ref(**kw):
    return lambda m: ReferenceBnSGD(m, m.spec(), **kw)


def _engine(compiled: bool = False, **kw):
    def make(m):
        opt = GSGD(m.parameters(), topology=m.spec().topology, compiled=compiled, **kw)
        if compiled:
            opt._graphs = ChainGraphs(backend="eager", fullgraph=True)
        return opt

    return make


@pytest.mark.parametrize("name", NAMES)
def test_segments_are_symmetries(name):
    """S1 (BatchNorm affines as units) and S2 (rows into a BatchNorm) leave the training-mode output
    unchanged; S1 leaves every chain's path values unchanged, S2 scales them; the bias of an S2 row
    has a zero gradient (BatchNorm subtracts the batch mean)."""
    model, x, y = setup_bn(name)
    out = model(x)
    values = [_path_values(DagBasis(c))[0] for c in model.spec().topology.chains]
    for s1, s2 in ((True, False), (False, True), (True, True)):
        twin = _twin(model, s1, s2)
        assert rel(twin(x), out) <= 1e-13
        moved = max(
            rel(u, v)
            for old, c in zip(values, twin.spec().topology.chains)
            for u, v in zip(_path_values(DagBasis(c))[0], old)
        )
        assert (moved <= 1e-12) == (not s2), moved
    ((out - y) ** 2).mean().backward()
    scale = max(p.grad.abs().max() for p in model.parameters())
    biases = [layer.bias for layer in model.spec().s2 if layer.bias is not None]
    assert all(b.grad.abs().max() <= 1e-13 * scale for b in biases)


@pytest.mark.parametrize("name,compiled", [(n, False) for n in NAMES] + [("basic", True)])
def test_engine_steps_bn_affine_chains(name, compiled):
    """S1 needs nothing new: a BatchNorm affine written as a chain layer ``[C, 1, 1]`` (gamma is the
    sigma edge of its unit, beta its hidden bias) runs on today's GSGD, which equals the DAG oracle to
    1e-10 (S2 layers take torch's SGD in both); gamma never moves (a sigma weight)."""
    model, x, y = setup_bn(name, rescaled=True)
    ours = copy.deepcopy(model)
    opt = train(ours, x, y, _engine(compiled, **HP), steps=3)
    assert int(opt.guard_hits) == 0
    ref = dag_oracle_run(model, model.spec().topology, x, lambda o: ((o - y) ** 2).mean(), 3, **HP)
    assert rel(ours(x), model(x)) > 1e-3
    for n, p in ours.named_parameters():
        assert torch.allclose(p, ref[n], rtol=1e-10, atol=1e-12 * ref[n].abs().max()), n
    for chain in ours.spec().topology.chains:
        gamma = chain.layers[0].weight
        assert torch.equal(gamma, dict(model.named_parameters())[chain.layers[0].name + ".weight"])


HYPERS = [
    dict(lr=0.02),
    dict(lr=0.02, momentum=0.9, weight_decay=0.01),
    dict(lr=0.02, momentum=0.5, dampening=0.3, weight_decay=0.001),
    dict(lr=0.02, momentum=0.9, nesterov=True, weight_decay=0.01),
]
CASES = [(n, h) for n in ("stack_deep", "basic") for h in HYPERS] + [(n, HYPERS[3]) for n in ("stack", "vgg_bn")]


@pytest.mark.parametrize("name,hyper", CASES)
def test_reference_matches_oracle(name, hyper):
    """The reference step (per-row factor n, buffer in normalized coordinates) is torch's SGD on path
    values with each S2 block retracted onto n_k = 1: the same training-mode function, the same
    normalized path values, the same parameters outside the chains, to 1e-10."""
    model, x, y = setup_bn(name, rescaled=True)
    ours = copy.deepcopy(model)
    opt = train(ours, x, y, _ref(**hyper), steps=3)
    assert opt.guard_hits == 0, "guard acted: the oracle does not model it"
    assert_matches_oracle(ours, model, x, y, 3, **hyper)


@pytest.mark.parametrize("name", NAMES)
def test_reference_reduces_to_gsgd(name):
    """Without S2 rows the reference is today's G-SGD (the engine) to 1e-12; with them, one step moves
    the layers of segments that end at the model output exactly as the engine does."""
    model, x, y = setup_bn(name, rescaled=True)
    hp = dict(HP, nesterov=True)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    train(a, x, y, _ref(s2=False, **hp), steps=3)
    train(b, x, y, _engine(**hp), steps=3)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-14 * q.abs().max().item()), n
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    train(a, x, y, _ref(**hp), steps=1)
    train(b, x, y, _engine(**hp), steps=1)
    s2 = {id(layer.weight) for layer in a.spec().s2}
    out_chains = [c for c in a.spec().topology.chains if not any(id(layer.weight) in s2 for layer in c.layers)]
    same = {id(p) for c in out_chains for layer in c.layers for p in (layer.weight, layer.bias) if p is not None}
    assert same
    for p, q in zip(a.parameters(), b.parameters()):
        if id(p) in same:
            assert torch.allclose(p, q, rtol=1e-12, atol=1e-14 * q.abs().max().item())


@pytest.mark.parametrize("name", NAMES)
def test_equivariance_s1_s2(name):
    """From a copy rescaled by random S1 and S2 factors, five steps with momentum and weight decay give
    the same training-mode function (1e-8 relative) with the reference step, with either momentum
    buffer; SGD does not, and today's G-SGD only under S1 (the factor n is what S2 needs)."""
    model, x, y = setup_bn(name)
    both, only_s1 = _twin(model, True, True), _twin(model, True, False)

    def gap(make, twin):
        a, b = copy.deepcopy(model), copy.deepcopy(twin)
        train(a, x, y, make)
        train(b, x, y, make)
        assert rel(a(x), model(x)) > 1e-3
        return rel(b(x), a(x)), a(x)

    r, out_norm = gap(_ref(**HP), both)
    assert r <= 1e-8
    r, out_path = gap(_ref(buffer="path", **HP), both)
    assert r <= 1e-8
    assert rel(out_path, out_norm) > 1e-6  # the two buffers are two algorithms
    assert gap(lambda m: torch.optim.SGD(m.parameters(), **HP), both)[0] > 1e-3
    assert gap(_engine(**HP), only_s1)[0] <= 1e-8
    assert gap(_engine(**HP), both)[0] > 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_authors_heuristic_commutes_with_neither(name):
    """Measured: the authors' heuristic (detect_topology(bn_mode="authors_heuristic") + GSGD) does not
    commute with S2 (5 steps from an S2-rescaled copy: 1e-1 to 1 relative on these models), nor with
    S1 (it leaves BatchNorm affines to SGD)."""
    model, x, y = setup_bn(name)

    def make(m):
        topo = detect_topology(m, x, bn_mode="authors_heuristic", allow_empty=True)
        assert topo.bn_layers  # the heuristic is in use
        return GSGD(m.parameters(), topology=topo, **HP)

    for s1, s2 in ((False, True), (True, False)):
        a, b = copy.deepcopy(model), _twin(model, s1, s2)
        train(a, x, y, make)
        train(b, x, y, make)
        assert rel(b(x), a(x)) > 1e-2


@pytest.mark.parametrize("momentum,exact", [(0.1, False), (None, True)])
def test_eval_mode(momentum, exact):
    """Eval mode is not part of the promise: S2 must also rescale the running statistics (buffers the
    optimizer never sees). From fresh statistics, the twins' eval-mode functions agree after five
    steps with a cumulative average (momentum=None), not with the default running average, whose
    initial values (mean 0, var 1) do not scale; S1 holds in eval mode either way."""
    model, x, y = setup_bn("stack_deep")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    outs = []
    for twin in (model, _twin(model, False, True), _twin(model, True, False)):
        t = copy.deepcopy(twin)
        for m in t.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
        train(t, x, y, _ref(**HP))
        outs.append(t.eval()(x))
    assert (rel(outs[1], outs[0]) <= 1e-8) == exact
    assert rel(outs[2], outs[0]) <= 1e-8


@pytest.mark.parametrize("name", ["stack_deep", "vgg_bn"])
def test_cheap_form_is_one_per_row_factor(name):
    """The engine's form (docs/math.md, "BatchNorm segments: S1 and S2"): on every entry that is
    neither sigma nor tau, the reference's step is "The cheap form" with ``s = 1 / (B F)`` replaced by
    ``q s``, ``q = sqrt(n)`` of the row: ``buf' = mu buf + (1 - damp)(q s g + wd w / (q s))`` and
    ``w' = (w - lr q s buf') / rho``; with no S2 row, the chain step is tests/reference_step.py's bit for bit."""
    from lightning_gsgd.step.hyper import Hyper
    from lightning_gsgd.topology.index import chain_backbone, chain_index
    from tests.reference_bn import bn_chain_step, chain_factors
    from tests.reference_step import gsgd_chain_step

    model, x, y = setup_bn(name, rescaled=True)
    ((model(x) - y) ** 2).mean().backward()
    hp = Hyper(0.02, 0.9, 0.3, 0.01, False)
    gen = torch.Generator().manual_seed(2)
    s2_ids = {id(layer.weight) for layer in model.spec().s2}
    with_s2 = 0
    for chain in model.spec().topology.chains:
        index, ls = chain_index(chain), chain.layers
        ws = [layer.weight3d().detach() for layer in ls]
        gs = [layer.weight3d(layer.weight.grad) for layer in ls]
        bs = [None if layer.bias is None else layer.bias.detach() for layer in ls]
        gbs = [None if b is None else layer.bias.grad for b, layer in zip(bs, ls)]
        wb = [torch.randn(w.shape, generator=gen, dtype=w.dtype) for w in ws]
        bb = [None if b is None else torch.randn(b.shape, generator=gen, dtype=b.dtype) for b in bs]
        args = (ws, gs, bs, gbs, wb, bb, index)
        plain = gsgd_chain_step(*args, [hp] * len(ls), [hp] * len(ls), 0.01)
        new_w, new_b, new_wb, new_bb, _ = bn_chain_step(*args, hp, set(), 0.01, "normalized")
        assert all(torch.equal(a, b) for a, b in zip(plain.weights, new_w))
        assert all(a is None or torch.equal(a, b) for a, b in zip(plain.biases, new_b))
        s2 = {l for l, layer in enumerate(ls) if id(layer.weight) in s2_ids}
        with_s2 += bool(s2)
        new_w, _, new_wb, _, _ = bn_chain_step(*args, hp, s2, 0.01, "normalized")
        B, F = chain_backbone(ws, index)
        q = chain_factors(ws, B, index, s2).sqrt()
        _, F_new = chain_backbone(new_w, index)
        for l, idx in enumerate(index):
            qs = (q[idx.rows] / F[l]).view(-1, 1, 1) / B[l].view(1, -1, 1)
            rho = (F_new[l] / F[l]).view(-1, 1, 1)
            buf = hp.momentum * wb[l] + (1 - hp.dampening) * (qs * gs[l] + hp.weight_decay * ws[l] / qs)
            w = (ws[l] - hp.lr * qs * buf) / rho
            free = torch.ones_like(w, dtype=torch.bool)
            for rows, cols in ((idx.sig_rows, idx.sig_cols), (idx.tau_rows, idx.tau_cols)):
                if rows is not None:
                    free[rows, cols, idx.centre] = False
            assert torch.allclose(new_wb[l][free], buf[free], rtol=1e-12, atol=0)
            assert torch.allclose(new_w[l][free], w[free], rtol=1e-12, atol=1e-15)
    assert with_s2
