"""G-SGD and G-space Adam on DAG chains (fan-out, concatenation, channel shuffle) against the oracle.

The models and their chains are written by hand (tests/dag_models.py); the oracle
(tests/oracle_dag.py) reads only the chains' ``sources`` and does everything else with loops and
autograd in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call

from lightning_gsgd import GSGD, GAdam, GAdamW, PathDiagnostics, init_skeleton_
from lightning_gsgd.step.graph import ChainGraphs
from lightning_gsgd.topology.index import chain_index
from tests.dag_models import DAG_MODELS, make_dag
from tests.oracle_dag import DagBasis, _path_values, dag_oracle_run, rescale_dag_units_

NAMES = list(DAG_MODELS)


def _target(model, x):
    out = model(x)
    return torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", NAMES)
def test_hand_written_chain_is_a_symmetry(name):
    """The chains of tests/dag_models.py are right: rescaling every claimed hidden unit (the
    oracle's own loops) leaves the output unchanged, and leaves every path value unchanged."""
    model, x, topo = make_dag(name)
    before = model(x)
    values = [_path_values(DagBasis(c))[0] for c in topo.chains]
    rescale_dag_units_(topo, spread=1.0, seed=3)
    assert torch.allclose(model(x), before, rtol=1e-12, atol=1e-12)
    for chain, old in zip(topo.chains, values):
        for v_old, v_new in zip(old, _path_values(DagBasis(chain))[0]):
            assert torch.allclose(v_new, v_old, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", NAMES)
def test_basis_count_and_choice(name):
    """m - H coordinates, and the library's sigma/tau edges are the oracle's."""
    _, _, topo = make_dag(name)
    for chain in topo.chains:
        basis = DagBasis(chain)
        index = chain_index(chain)
        coords = 0
        for l, layer in enumerate(chain.layers):
            sig = sum(basis.hidden[l] for _ in range(layer.n_out))
            coords += layer.weight.numel() - sig + (layer.n_out if layer.bias is not None and basis.hidden[l] else 0)
            idx = index[l]
            assert idx.hidden == basis.hidden[l]
            if idx.tau_rows is not None:
                for node, r, c in zip(idx.tau_nodes.tolist(), idx.tau_rows.tolist(), idx.tau_cols.tolist()):
                    owner = next(k for k, i in enumerate(index) if i.hidden and i.row_off <= node < i.row_off + i.n_out)
                    assert basis.tau[(owner, node - index[owner].row_off)] == (l, r, c)
        assert coords == chain.basis_paths
        assert len(basis.tau) == chain.hidden_units  # one tau edge per hidden node


HYPERS = [
    (dict(lr=1e-3), 1),
    (dict(lr=1e-3, momentum=0.9, weight_decay=0.01), 3),
    (dict(lr=1e-3, momentum=0.5, dampening=0.3, weight_decay=0.001, nesterov=False), 3),
    (dict(lr=1e-3, momentum=0.9, nesterov=True), 3),
]


def _compare(model, x, topo, make_opt, steps, oracle_opt, oracle_kwargs):
    y = _target(model, x)

    def loss_fn(out):
        return ((out - y) ** 2).mean()

    ours, _, topo_ours = _rebind(copy.deepcopy(model), topo, model)
    opt = make_opt(ours.parameters(), topo_ours)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(ours(x)).backward()
        opt.step()
    assert int(opt.guard_hits) == 0, "guard acted: the oracle does not model it"
    ref = dag_oracle_run(model, topo, x, loss_fn, steps, optimizer=oracle_opt, **oracle_kwargs)
    out_ref = functional_call(model, ref, (x,))
    assert (out_ref - model(x)).abs().max() > 1e-6, "the step did nothing: the comparison would be vacuous"
    rel = (ours(x) - out_ref).abs().max() / out_ref.abs().max()
    assert rel <= 1e-10
    for n, p in ours.named_parameters():
        assert torch.allclose(p, ref[n], rtol=1e-10, atol=1e-12 * ref[n].abs().max()), n
    return opt


# Default run: eager from the rescaled init (B not 1) with every setting and from the skeleton init with
# momentum and weight decay on two models; the traced compiled graph with momentum and weight decay on
# two models. The rest of the matrix (and Inductor's kernels) is marked slow; CI runs it.
_SLOW = pytest.mark.slow
CASES = [
    pytest.param(n, i, h, s, False, marks=() if i == "rescaled" or (k == 1 and n in ("fire", "dense")) else _SLOW)
    for n in NAMES
    for i in ("skeleton", "rescaled")
    for k, (h, s) in enumerate(HYPERS)
]
CASES += [
    pytest.param(n, "rescaled", h, s, True, marks=() if k == 1 and n in ("fire", "shuffle") else _SLOW)
    for n in NAMES
    for k, (h, s) in enumerate(HYPERS)
    if not h.get("dampening")
]
CASES += [pytest.param(n, "rescaled", *HYPERS[1], "inductor", marks=_SLOW) for n in ("fire", "dense")]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _gsgd(compiled: bool | str, **hyper):
    """GSGD eager, compiled with Inductor (``"inductor"``), or its traced graph run by torch (``True``)."""

    def make(params, topo):
        opt = GSGD(params, topology=topo, compiled=bool(compiled), **hyper)
        if compiled is True:
            opt._graphs = ChainGraphs(backend="eager", fullgraph=True)
        return opt

    return make


@pytest.mark.parametrize("name,init,hyper,steps,compiled", CASES)
def test_gsgd_matches_dag_oracle(name, init, hyper, steps, compiled):
    model, x, topo = make_dag(name)
    init_skeleton_(topo)
    if init == "rescaled":
        rescale_dag_units_(topo, spread=0.5, seed=7)
    h = dict(hyper, lr=hyper["lr"] * 10)
    opt = _compare(model, x, topo, _gsgd(compiled, **h), steps, torch.optim.SGD, h)
    assert (opt._graphs is not None and bool(opt._graphs.compiled)) == bool(compiled)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "cls,torch_cls,hyper",
    [
        (GAdam, torch.optim.Adam, dict(lr=1e-3, weight_decay=0.01)),
        (GAdam, torch.optim.Adam, dict(lr=1e-3, amsgrad=True)),
        (GAdamW, torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.1)),
    ],
)
def test_gadam_matches_dag_oracle(name, cls, torch_cls, hyper):
    model, x, topo = make_dag(name)
    init_skeleton_(topo)
    _compare(model, x, topo, lambda ps, t: cls(ps, topology=t, **hyper), 5, torch_cls, hyper)


@pytest.mark.parametrize("name", NAMES)
def test_equivariance_on_dags(name):
    """From a randomly rescaled copy, five G-SGD steps (momentum, weight decay) give the same function
    as from the original; plain SGD, the control, does not."""
    model, x, topo = make_dag(name)
    init_skeleton_(topo)
    y = _target(model, x)
    twin = copy.deepcopy(model)
    _, _, topo_twin = _rebind(twin, topo, model)
    rescale_dag_units_(topo_twin, spread=1.0, seed=5)
    assert torch.allclose(twin(x), model(x), rtol=1e-12, atol=1e-12)

    def run(m, t, make):
        opt = make(m.parameters(), t)
        for _ in range(5):
            opt.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            opt.step()
        return m(x)

    for make, equal in (
        (lambda ps, t: GSGD(ps, lr=0.02, momentum=0.9, weight_decay=0.01, topology=t), True),
        (lambda ps, t: torch.optim.SGD(ps, lr=0.02, momentum=0.9, weight_decay=0.01), False),
    ):
        a, b = copy.deepcopy(model), copy.deepcopy(twin)
        _, _, ta = _rebind(a, topo, model)
        _, _, tb = _rebind(b, topo_twin, twin)
        out_a, out_b = run(a, ta, make), run(b, tb, make)
        moved = (out_a - model(x)).abs().max()
        assert moved > 1e-4
        rel = ((out_a - out_b).abs().max() / out_a.abs().max()).item()
        assert (rel <= 1e-8) == equal, rel


def _rebind(copy_model, topo, original):
    """``topo`` pointed at ``copy_model``'s parameters (a deep copy of ``original``)."""
    from dataclasses import replace

    mapping = dict(zip(original.parameters(), copy_model.parameters()))

    def lay(layer):
        return replace(layer, weight=mapping[layer.weight], bias=None if layer.bias is None else mapping[layer.bias])

    chains = tuple(replace(c, layers=tuple(lay(layer) for layer in c.layers)) for c in topo.chains)
    return copy_model, None, replace(topo, chains=chains)


@pytest.mark.parametrize("name", NAMES)
def test_diagnostics_path_gradient_on_dags(name):
    """``gsgd/path_grad_norm`` on a DAG chain is the norm of autograd's gradient with respect to
    the oracle's path values; the optimizer's by-product readings agree with the direct ones."""
    from tests.oracle_dag import DagPathParameterization

    model, x, topo = make_dag(name)
    init_skeleton_(topo)
    y = _target(model, x)
    pp = DagPathParameterization(model, topo)
    ((pp.forward(x) - y) ** 2).mean().backward()
    sq = torch.zeros((), dtype=torch.float64)
    for basis, vw, vb, _, _, _ in pp.chains:
        for l, v in enumerate(vw):
            g = v.grad.clone()
            layer = basis.chain.layers[l]
            for b in range(layer.n_out):
                if basis.hidden[l]:
                    g[b, basis.sigma_col(l, b), layer.centre] = 0  # sigma entries are no coordinates
            sq += g.square().sum()
        sq += sum(v.grad.square().sum() for v in vb if v is not None)
    model.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    diag = PathDiagnostics(topo)
    direct = diag.before_step()
    assert torch.allclose(direct["path_grad_norm"].double(), sq.sqrt(), rtol=1e-10)
    opt = GSGD(model.parameters(), lr=1e-3, topology=topo, compiled=False)
    byproduct = {**diag.before_step(opt)}
    opt.step()
    byproduct |= diag.after_step(opt)
    for k in direct:
        assert torch.allclose(byproduct[k].double(), direct[k].double(), rtol=1e-9, atol=1e-12), k


def test_pathsgd_and_sharding_refuse_dag_chains():
    from lightning_gsgd import PathSGD, TopologyError, shard_topology

    model, _, topo = make_dag("fire")
    with pytest.raises(TopologyError, match=r"PathSGD: 1 chain\(s\) with fan-out or concatenation \(stem..cls\)"):
        PathSGD(model.parameters(), lr=0.1, topology=topo)
    with pytest.raises(TopologyError, match="shard_topology: 1 chain.*sequence chains only"):
        shard_topology(topo, model)


@pytest.mark.parametrize(
    "name,cls,torch_cls,hyper",
    [
        (n, c, tc, h) if (n, c) == ("dense", GAdamW) else pytest.param(n, c, tc, h, marks=pytest.mark.slow)
        for n in ("fanout3", "fire", "dense", "shuffle")
        for c, tc, h in (
            (GAdam, torch.optim.Adam, dict(lr=1e-3, amsgrad=True)),
            (GAdamW, torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.1)),
        )
    ],
)
def test_compiled_gadam_matches_dag_oracle(name, cls, torch_cls, hyper):
    """The compiled G-Adam graph (traced, run by torch) on DAG chains, from a non-unit B."""
    from lightning_gsgd.step.adam_graph import AdamGraphs

    model, x, topo = make_dag(name)
    init_skeleton_(topo)
    rescale_dag_units_(topo, spread=0.5, seed=7)

    def make(ps, t):
        opt = cls(ps, topology=t, compiled=True, **hyper)
        opt._graphs = AdamGraphs(backend="eager", fullgraph=True)
        return opt

    opt = _compare(model, x, topo, make, 4, torch_cls, hyper)
    assert opt._graphs is not None and opt._graphs.compiled
