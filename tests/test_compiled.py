"""``GSGD(compiled=True)``: the whole step as one torch.compile graph (:mod:`lightning_gsgd.step.graph`).

The compiled step is checked against the brute-force path-space oracle (float64), like the eager
step in test_oracle.py: with Inductor (real generated kernels) on a few models and every momentum
form, and with Dynamo's ``eager`` backend (the same traced graphs, run by torch) on every model,
initialization and hyper-parameter set.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo

from lightning_gsgd import GSGD, GSGDCallback, detect_topology
from lightning_gsgd.step.graph import ChainGraphs
from tests.lightning_models import MLPModule, clone, cpu_trainer, make_dataset, make_loader, params_of
from tests.models import INITS, MODELS, initialize, make
from tests.oracle import run_against_oracle

HYPERS = [
    (dict(lr=1e-3), 2),
    (dict(lr=1e-3, momentum=0.9, weight_decay=0.01), 3),
    (dict(lr=1e-3, momentum=0.5, dampening=0.3, weight_decay=0.001), 3),
    (dict(lr=1e-3, momentum=0.9, nesterov=True, weight_decay=0.01), 3),
]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # every test compiles its own kernels (Dynamo's per-function cache has a size limit)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _run_and_compare(name: str, init: str, hyper: dict, steps: int, backend: str | None) -> GSGD:
    def make_optimizer(params, topo, **h):
        opt = GSGD(params, topology=topo, compiled=True, **h)
        if backend is not None:
            opt._graphs = ChainGraphs(backend=backend, fullgraph=True)
        return opt

    opt = run_against_oracle(name, init, hyper, steps, make_optimizer)
    assert int(opt.skipped_steps) == 0
    return opt


@pytest.mark.parametrize("hyper,steps", HYPERS)
@pytest.mark.parametrize("name,init", [("mlp_unequal", "skeleton_rescaled"), ("cnn", "skeleton")])
def test_inductor_kernels_match_the_oracle(name, init, hyper, steps):
    opt = _run_and_compare(name, init, hyper, steps, backend=None)
    assert opt._graphs is not None and opt._graphs.compiled, "the graph never ran"


# Every model from the skeleton init, and each other init on a few models, in the default run; the rest
# of the matrix is marked slow (CI runs it) to keep the default run near five minutes on two cores.
_DEFAULT_RUN = {("mlp_unequal", "skeleton_rescaled"), ("cnn", "skeleton_rescaled"), ("mixed", "order_one")}
EVERYWHERE = [
    pytest.param(name, init, marks=() if init == "skeleton" or (name, init) in _DEFAULT_RUN else pytest.mark.slow)
    for name in MODELS
    for init in INITS
]


@pytest.mark.parametrize("hyper,steps", HYPERS)
@pytest.mark.parametrize("name,init", EVERYWHERE)
def test_traced_graphs_match_the_oracle_everywhere(name, init, hyper, steps):
    _run_and_compare(name, init, hyper, steps, backend="eager")


def test_a_scheduler_changes_the_lr_without_recompiling():
    model, x = make("mlp_unequal")
    topo = detect_topology(model, x)
    initialize(model, topo, "skeleton")
    twin = copy.deepcopy(model)
    opts = [
        GSGD(m.parameters(), lr=1e-3, momentum=0.9, topology=detect_topology(m, x), compiled=c)
        for m, c in ((model, True), (twin, False))
    ]
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in opts]
    frames_before = None
    for k in range(4):
        for m, o, s in zip((model, twin), opts, scheds):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
            s.step()
        if k == 0:  # the graph is compiled on the first step (its buffers start at zero)
            frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames_before
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_lr_zero_returns_every_weight_bit_for_bit():
    model, x = make("cnn")
    topo = detect_topology(model, x)
    initialize(model, topo, "skeleton_rescaled")
    before = [p.detach().clone() for p in model.parameters()]
    opt = GSGD(model.parameters(), lr=0.0, momentum=0.9, weight_decay=0.0, topology=topo, compiled=True)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


@pytest.mark.slow  # ~15 s: compiles many kernels
def test_many_optimizers_in_one_process_each_compile_their_own_kernels():
    # Dynamo keeps compiled variants per code object, with a limit of 8; a shared function would hit
    # it after a few model structures (with fullgraph=True that is a hard error in the middle of a step)
    n = 0
    for name in MODELS:
        for momentum in (0.0, 0.9):
            model, x = make(name)
            topo = detect_topology(model, x)
            initialize(model, topo, "skeleton")
            opt = GSGD(model.parameters(), lr=1e-4, momentum=momentum, topology=topo, compiled=True)
            opt._graphs = ChainGraphs(backend="eager", fullgraph=True)
            for _ in range(2):
                opt.zero_grad()
                model(x).square().mean().backward()
                opt.step()
            assert int(opt.steps) == 2
            n += 1
    assert n > 8


def test_compiled_must_be_a_bool():
    model, x = make("mlp_equal")
    with pytest.raises(TypeError, match="compiled must be True or False"):
        GSGD(model.parameters(), lr=0.1, topology=detect_topology(model, x), compiled="yes")  # type: ignore[arg-type]


def test_callback_turns_sgd_into_a_compiled_gsgd_that_trains_like_the_eager_one():
    torch.manual_seed(0)
    model = MLPModule(lr=0.05, momentum=0.9, weight_decay=1e-3)
    twin, start = clone(model), params_of(model)
    opts = []
    for m, compiled in ((model, True), (twin, None)):
        trainer = cpu_trainer(max_steps=4, callbacks=[GSGDCallback(compiled=compiled)])
        trainer.fit(m, make_loader(make_dataset(), 8))
        opts.append(trainer.optimizers[0])
    assert [type(o) for o in opts] == [GSGD, GSGD] and [o.compiled for o in opts] == [True, False]
    assert opts[0]._graphs is not None and opts[0]._graphs.compiled
    got, want = params_of(model), params_of(twin)
    assert max(float((want[n] - start[n]).abs().max()) for n in want) > 1e-3  # training moved the weights
    for n in want:  # float32: the graph rounds once where the eager passes round five times
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6)


def test_callback_refuses_a_non_bool_compiled():
    with pytest.raises(TypeError, match="compiled"):
        GSGDCallback(compiled="yes")  # type: ignore[arg-type]


def _twin_steps(model, x, make_opts, steps, grad_hook=None):
    """Step a model and its copy, one with each optimizer from ``make_opts(model, twin)``, on the same loss."""
    twin = copy.deepcopy(model)
    opts = make_opts(model, twin)
    for k in range(steps):
        for m, o in zip((model, twin), opts):
            o.zero_grad()
            m(x).square().mean().backward()
            if grad_hook is not None:
                grad_hook(k, m)
            o.step()
    return twin, opts


def _graph(opt):
    opt._graphs = ChainGraphs(backend="eager", fullgraph=True)
    return opt


def test_per_layer_groups_tensor_lr_nesterov_and_the_guard_agree_with_the_eager_step():
    # one group per layer with different momentum forms, a tensor lr and an lr that makes the guard
    # clamp: the hyper-parameter table's rows, not the graph, carry the differences
    model, x = make("mixed")
    topo = detect_topology(model, x)
    initialize(model, topo, "skeleton_rescaled")

    def groups(m):
        mods = [mod for mod in m.modules() if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))]
        forms = [
            dict(lr=torch.tensor(0.5, dtype=torch.float64), momentum=0.9),
            dict(lr=3.0, momentum=0.0, weight_decay=0.01),
            dict(lr=0.2, momentum=0.8, nesterov=True, weight_decay=0.001),
            dict(lr=0.3, momentum=0.5, dampening=0.4),
        ]
        return [dict(params=list(mod.parameters()), **forms[i % len(forms)]) for i, mod in enumerate(mods)]

    def make_opts(m, t):
        return (
            _graph(GSGD(groups(m), lr=0.1, topology=detect_topology(m, x), compiled=True)),
            GSGD(groups(t), lr=0.1, topology=detect_topology(t, x)),
        )

    twin, (graph, eager) = _twin_steps(model, x, make_opts, steps=4)
    assert graph._graphs.compiled, "the graph never ran"
    assert int(eager.guard_hits) > 0, "the guard never acted: that case proves nothing"
    for counter in ("steps", "skipped_steps", "guard_hits"):
        assert int(getattr(graph, counter)) == int(getattr(eager, counter)), counter
    for (n, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=n)
        ba, bb = graph.state[a].get("momentum_buffer"), eager.state[b].get("momentum_buffer")
        assert (ba is None) == (bb is None), n
        if ba is not None:
            torch.testing.assert_close(ba.view_as(bb), bb, rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.parametrize("where", ["chain_weight", "output_bias"])
def test_a_non_finite_gradient_skips_the_whole_compiled_step(where):
    model, x = make("cnn")
    topo = detect_topology(model, x)
    initialize(model, topo, "skeleton_rescaled")
    twin = copy.deepcopy(model)
    h = dict(lr=1e-2, momentum=0.9, weight_decay=1e-3)
    graph = _graph(GSGD(model.parameters(), topology=topo, compiled=True, **h))
    eager = GSGD(twin.parameters(), topology=detect_topology(twin, x), **h)
    names = [n for n, _ in model.named_parameters()]
    # a hidden conv's weight (a chain tensor), or the head's bias (a parameter outside chains)
    poisoned = names.index("3.0.weight") if where == "chain_weight" else len(names) - 1
    start = [p.detach().clone() for p in model.parameters()]
    for k in range(4):
        for m, o in ((model, graph), (twin, eager)):
            o.zero_grad()
            m(x).square().mean().backward()
            if k in (0, 2):
                list(m.parameters())[poisoned].grad.view(-1)[1] = float("nan")
            o.step()
        if k == 0:  # skipped: nothing moved, and no momentum buffer was made (as in the eager step)
            assert all(torch.equal(a, b) for a, b in zip(model.parameters(), start))
            assert int(graph.skipped_steps) == 1 and int(graph.steps) == 0 and len(graph.state) == 0
    assert int(graph.skipped_steps) == int(eager.skipped_steps) == 2
    assert int(graph.steps) == int(eager.steps) == 2
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        buf_a, buf_b = graph.state[a]["momentum_buffer"], eager.state[b]["momentum_buffer"]
        torch.testing.assert_close(buf_a.view_as(buf_b), buf_b, rtol=1e-10, atol=1e-12)


def test_a_gradient_that_vanishes_for_a_step_compiles_a_second_variant():
    # a hidden bias without a gradient for one step changes which tensors the graph reads
    model, x = make("mlp_unequal")
    topo = detect_topology(model, x)
    initialize(model, topo, "skeleton_rescaled")

    def drop(k, m):
        if k == 1:
            next(mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)).bias.grad = None

    def make_opts(m, t):
        return (
            _graph(GSGD(m.parameters(), lr=1e-2, momentum=0.9, topology=detect_topology(m, x), compiled=True)),
            GSGD(t.parameters(), lr=1e-2, momentum=0.9, topology=detect_topology(t, x)),
        )

    twin, (graph, eager) = _twin_steps(model, x, make_opts, steps=3, grad_hook=drop)
    assert len(graph._graphs.compiled) == 2
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_rows_too_long_for_float32_row_numbers_are_refused_by_name():
    # the graph tells sigma and tau entries apart by comparing row/entry numbers stored as float32
    from types import SimpleNamespace

    from lightning_gsgd.step.graph_chain import graph_chain

    plan = SimpleNamespace(n_layers=2, shape3=((3, 2**24 + 1, 1), (2, 3, 1)))
    with pytest.raises(ValueError, match="compiled=False"):
        graph_chain(plan, (0, 0))  # type: ignore[arg-type]
