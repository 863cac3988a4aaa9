"""Exact G-SGD on BatchNorm segments in the engine (docs/math.md, "BatchNorm segments: S1 and S2"):
``GSGD`` on a topology with S2 layers (``Chain.normalized``, ``Topology.normalized``) against the
brute-force oracle (tests/oracle_bn.py: SGD on path values, each S2 block retracted onto ``n_k = 1``)
and the reference step (tests/reference_bn.py), and equivariant under S1 and S2 jointly.

Models: tests/bn_models.py (float64, BatchNorm eps = 1e-30, training mode).
"""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_gsgd import GSGD
from lightning_gsgd.step.graph import ChainGraphs
from tests.bn_exact import exact_topology
from tests.bn_models import BN_MODELS
from tests.oracle_bn import BnOracle, assert_matches_oracle, oracle_run, rel, rescale_bn_, setup_bn, train
from tests.reference_bn import ReferenceBnSGD

NAMES = list(BN_MODELS)
HYPERS = [
    dict(lr=0.02),
    dict(lr=0.02, momentum=0.9, weight_decay=0.01),
    dict(lr=0.02, momentum=0.5, dampening=0.3, weight_decay=0.001),
    dict(lr=0.02, momentum=0.9, nesterov=True, weight_decay=0.01),
]


def _engine(compiled: bool = False, **hp):
    def make(m):
        opt = GSGD(m.parameters(), topology=exact_topology(m.spec()), compiled=compiled, **hp)
        if compiled:
            opt._graphs = ChainGraphs(backend="eager", fullgraph=True)
        return opt

    return make


CASES = [(n, h, False) for n in NAMES for h in (HYPERS[1], HYPERS[3])]
CASES += [("basic", h, False) for h in (HYPERS[0], HYPERS[2])] + [("basic", HYPERS[1], True)]
CASES += [("basic_skip", HYPERS[0], False), ("basic_skip", HYPERS[2], True)]
CASES += [pytest.param("vgg_bn", HYPERS[1], True, marks=pytest.mark.slow)]  # compiled cases cost seconds each


@pytest.mark.parametrize("name,hyper,compiled", CASES)
def test_engine_matches_oracle(name, hyper, compiled):
    """Three steps of the engine equal the oracle's (SGD on path values, blocks retracted onto n = 1):
    the same training-mode function and the same normalized path values, to 1e-10, from a start with
    B != 1 and rows of any norm (the oracle's weights are its retracted ones, so they are compared
    through these invariants)."""
    model, x, y = setup_bn(name, rescaled=True)
    ours = copy.deepcopy(model)
    opt = train(ours, x, y, _engine(compiled, **hyper), steps=3)
    assert int(opt.guard_hits) == 0, "guard acted: the oracle does not model it"
    assert int(opt.skipped_steps) == 0
    assert_matches_oracle(ours, model, x, y, 3, **hyper)


@pytest.mark.parametrize("name", NAMES)
def test_engine_matches_reference_step(name):
    """The engine's parameters and momentum buffers equal the reference step's (buffer in normalized
    coordinates: torch's SGD on the slice) over five Nesterov steps."""
    model, x, y = setup_bn(name, rescaled=True)
    hp = HYPERS[3]
    ours, ref = copy.deepcopy(model), copy.deepcopy(model)
    opt = train(ours, x, y, _engine(**hp), steps=5)
    train(ref, x, y, lambda m: ReferenceBnSGD(m, m.spec(), **hp), steps=5)
    for (n, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert torch.allclose(p, q, rtol=1e-10, atol=1e-12 * q.abs().max().item()), n
    assert int(opt.steps) == 5


@pytest.mark.parametrize(
    "name,compiled",
    [(n, False) for n in NAMES]
    + [("basic", True), ("basic_skip", True)]
    + [pytest.param(n, True, marks=pytest.mark.slow) for n in NAMES if n not in ("basic", "basic_skip")],
)
def test_equivariance_s1_s2(name, compiled):
    """From a copy rescaled by random S1 and S2 factors (spread exp(U(-1, 1))), five steps with momentum
    and weight decay give the same training-mode function to 1e-8 relative; SGD does not."""
    model, x, y = setup_bn(name)
    twin = copy.deepcopy(model)
    rescale_bn_(twin.spec(), spread=1.0, seed=5)
    hp = HYPERS[1]
    a, b = copy.deepcopy(model), copy.deepcopy(twin)
    train(a, x, y, _engine(compiled, **hp), steps=5)
    train(b, x, y, _engine(compiled, **hp), steps=5)
    assert rel(a(x), model(x)) > 1e-3
    assert rel(b(x), a(x)) <= 1e-8
    a, b = copy.deepcopy(model), copy.deepcopy(twin)
    train(a, x, y, lambda m: torch.optim.SGD(m.parameters(), **hp), steps=5)
    train(b, x, y, lambda m: torch.optim.SGD(m.parameters(), **hp), steps=5)
    assert rel(b(x), a(x)) > 1e-3


ADAM_CASES = [
    (n, opt, hp, False)
    for n in NAMES
    for opt, hp in (("GAdam", dict(lr=0.01, weight_decay=0.01)), ("GAdamW", dict(lr=0.01, weight_decay=0.1)))
]
ADAM_CASES += [("basic", "GAdam", dict(lr=0.01, amsgrad=True), False)]
ADAM_CASES += [("basic", "GAdamW", dict(lr=0.01, weight_decay=0.1), True)]
ADAM_CASES += [("basic_skip", "GAdamW", dict(lr=0.01, weight_decay=0.1), True)]
ADAM_CASES += [pytest.param("vgg_bn", "GAdamW", dict(lr=0.01, weight_decay=0.1), True, marks=pytest.mark.slow)]


@pytest.mark.parametrize("name,kind,hyper,compiled", ADAM_CASES)
def test_gadam_matches_oracle(name, kind, hyper, compiled):
    """G-space Adam/AdamW on BatchNorm segments is torch's Adam/AdamW on the path values with every S2
    block retracted onto n = 1 (the oracle with Adam): the same function and normalized path values
    after three steps, to 1e-9, eager and compiled."""
    from lightning_gsgd import GAdam, GAdamW
    from lightning_gsgd.step.adam_graph import AdamGraphs

    cls = {"GAdam": GAdam, "GAdamW": GAdamW}[kind]
    torch_cls = {"GAdam": torch.optim.Adam, "GAdamW": torch.optim.AdamW}[kind]

    def make(m):
        opt = cls(m.parameters(), topology=exact_topology(m.spec()), compiled=compiled, **hyper)
        if compiled:
            opt._compiled_step.graphs = AdamGraphs(backend="eager", fullgraph=True)
        return opt

    model, x, y = setup_bn(name, rescaled=True)
    ours = copy.deepcopy(model)
    opt = train(ours, x, y, make, steps=3)
    assert int(opt.skipped_steps) == 0 and int(opt.guard_hits) == 0
    theirs = copy.deepcopy(model)
    loss = lambda o: ((o - y) ** 2).mean()  # noqa: E731
    theirs.load_state_dict(oracle_run(model, model.spec(), x, loss, 3, torch_cls, **hyper), strict=False)
    assert rel(ours(x), model(x)) > 1e-3
    assert rel(ours(x), theirs(x)) <= 1e-9
    # The biases before a BatchNorm have a gradient of rounding noise only (about 1e-16 of the
    # others): Adam divides it by its own scale, so those biases move by noise that differs between
    # two float computations of the same gradient. They change nothing in the function (checked
    # above) and are compared loosely; everything else to 1e-9.
    noise = {layer.name + ".bias" for layer in model.spec().s2 if layer.bias is not None}
    assert noise
    biases = [ours.get_parameter(n).detach() for n in noise]

    def is_noise(leaf: torch.Tensor) -> bool:  # the leaf of an S2 bias holds that bias as it is
        return any(leaf.shape == b.shape and torch.equal(leaf.detach(), b) for b in biases)

    a_pp, b_pp = BnOracle(ours, ours.spec()).pp, BnOracle(theirs, theirs.spec()).pp
    assert sum(is_noise(a) for a in a_pp.leaves) == len(noise)
    for a, b in zip(a_pp.leaves, b_pp.leaves):
        tol = 1e-6 if is_noise(a) else 1e-9
        assert torch.allclose(a, b, rtol=tol, atol=tol * 1e-2 * b.abs().max().item())


@pytest.mark.parametrize("name", ["stack_deep", "basic"])
def test_diagnostics_read_normalized_path_values(name):
    """With S2 layers the diagnostics read the normalized path values: the gradient norm, the path norm,
    the skeleton values and the relative update of a step are the same on an S1- and S2-rescaled twin
    (1e-9); the optimizer does not take the readings request (its step would read unnormalized values)."""
    from lightning_gsgd.diagnostics.metrics import PathDiagnostics

    model, x, y = setup_bn(name)
    twin = copy.deepcopy(model)
    rescale_bn_(twin.spec(), spread=1.0, seed=5)
    got = []
    for m in (model, twin):
        topo = exact_topology(m.spec())
        opt = GSGD(m.parameters(), topology=topo, compiled=False, **HYPERS[1])
        diag = PathDiagnostics(topo)
        opt.zero_grad()
        ((m(x) - y) ** 2).mean().backward()
        before = diag.before_step(opt)
        assert before, "the optimizer took the request: the readings would come from the step"
        opt.step()
        got.append({**before, **diag.after_step(opt)})
    for k in ("path_grad_norm", "basis_path_norm", "skeleton_abs_min", "skeleton_abs_max", "relative_update"):
        assert abs(got[0][k] - got[1][k]) <= 1e-9 * abs(got[1][k]), k
    assert got[0]["relative_update"] > 1e-4


@pytest.mark.parametrize(
    "kind,compiled,name",
    [
        ("GSGD", False, "stack_deep"),
        pytest.param("GSGD", True, "stack_deep", marks=pytest.mark.slow),
        ("GAdamW", False, "stack_deep"),
        ("GSGD", False, "basic"),  # residual streams: the tied BatchNorms' buffers and moments
        ("GAdamW", False, "basic"),
    ],
)
def test_resume_is_bit_identical(kind, compiled, name):
    """Six steps straight equal three steps, a state_dict round trip into a new optimizer, and three
    more, bit for bit (the momentum buffers and moments of S2 rows in normalized coordinates, the
    counters); a state saved without the S2 marks does not load."""
    from lightning_gsgd import GAdamW, TopologyError

    def make(m, topo=None):
        topo = topo or exact_topology(m.spec())
        if kind == "GSGD":
            opt = GSGD(m.parameters(), topology=topo, compiled=compiled, **HYPERS[1])
            if compiled:
                opt._graphs = ChainGraphs(backend="eager", fullgraph=True)
            return opt
        return GAdamW(m.parameters(), topology=topo, compiled=compiled, lr=0.01, weight_decay=0.1)

    model, x, y = setup_bn(name, rescaled=True)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    train(a, x, y, make, steps=6)
    opt = train(b, x, y, make, steps=3)
    saved = copy.deepcopy(opt.state_dict())
    again = make(b)
    again.load_state_dict(saved)
    for _ in range(3):
        again.zero_grad()
        ((b(x) - y) ** 2).mean().backward()
        again.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert int(again.steps) == 6
    plain = make(b, b.spec().topology)  # the same chains without S2 marks
    with pytest.raises(TopologyError):
        plain.load_state_dict(saved)


@pytest.mark.parametrize("kind", ["GSGD", "GAdam"])
@pytest.mark.parametrize("name,nan_in", [("stack", "c0.weight"), ("basic", "abn2.weight")])
def test_sync_free_path_equals_host_read_path(kind, name, nan_in):
    """The path that accelerators take (``host_reads = False``: copies applied with ``torch.where``, no
    host read) gives the same steps as the CPU path on BatchNorm segments, layers alone included, and
    skips a step with a non-finite gradient in the same way (``basic``: in a tied BatchNorm of a
    residual stream, which only the row sums see)."""
    from lightning_gsgd import GAdam

    model, x, y = setup_bn(name, rescaled=True)
    runs = []
    for host_reads in (True, False):
        m = copy.deepcopy(model)
        topo = exact_topology(m.spec())
        if kind == "GSGD":
            opt = GSGD(m.parameters(), topology=topo, compiled=False, **HYPERS[1])
        else:
            opt = GAdam(m.parameters(), topology=topo, compiled=False, lr=0.01, weight_decay=0.01)
        opt.host_reads = host_reads
        for k in range(4):
            opt.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            if k == 2:
                m.get_parameter(nan_in).grad.view(-1)[0] = float("nan")  # the whole step is skipped
            opt.step()
        runs.append((m, opt))
    (a, oa), (b, ob) = runs
    assert int(oa.skipped_steps) == int(ob.skipped_steps) == 1
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-14), n
