"""``GSGD(compiled=True)``: the torch.compile kernels of :mod:`lightning_gsgd.chain_fused`.

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
from lightning_gsgd.chain_fused import FusedPasses
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
            opt._fused = FusedPasses(backend=backend, fullgraph=True)
        return opt

    opt = run_against_oracle(name, init, hyper, steps, make_optimizer)
    assert int(opt.skipped_steps) == 0
    return opt


@pytest.mark.parametrize("hyper,steps", HYPERS)
@pytest.mark.parametrize("name,init", [("mlp_unequal", "skeleton_rescaled"), ("cnn", "skeleton")])
def test_inductor_kernels_match_the_oracle(name, init, hyper, steps):
    opt = _run_and_compare(name, init, hyper, steps, backend=None)
    assert opt._fused is not None and opt._fused._update is not None and opt._fused._sums is not None


@pytest.mark.parametrize("hyper,steps", HYPERS)
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("name", list(MODELS))
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
        if k == 1:  # first momentum step (eager) and first compiled step are done
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
            opt._fused = FusedPasses(backend="eager", fullgraph=True)
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
    assert opts[0]._fused is not None and opts[0]._fused._update is not None
    got, want = params_of(model), params_of(twin)
    assert max(float((want[n] - start[n]).abs().max()) for n in want) > 1e-3  # training moved the weights
    for n in want:  # float32: the fused kernels round once where the eager passes round five times
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6)


def test_callback_refuses_a_non_bool_compiled():
    with pytest.raises(TypeError, match="compiled"):
        GSGDCallback(compiled="yes")  # type: ignore[arg-type]
