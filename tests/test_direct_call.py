"""The compiled step's graph called without Dynamo (:mod:`lightning_gsgd.step.direct_call`), GSGD and GAdamW.

``InductorCapture`` binds the graph Inductor compiled to the caller's tensors by identity, and then runs
it only on inputs that pass Dynamo's tensor checks. The GSGD cases step two copies of a model with the
same gradients through Inductor: one may replay without Dynamo, the other always goes through
``torch.compile``; a change between steps must leave both bit for bit equal, and the call without
Dynamo must be refused exactly when an input's layout or dtype changed.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo

from lightning_gsgd import GSGD, GAdamW, detect_topology
from lightning_gsgd.step import direct_call
from lightning_gsgd.step.direct_call import InductorCapture
from tests.models import initialize, make


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _add(a: torch.Tensor, b: torch.Tensor) -> None:
    a.add_(b * 2)


def _compiled(fn, capture: InductorCapture):
    return torch.compile(fn, backend=capture, dynamic=False)


def test_a_bound_graph_runs_only_on_inputs_like_the_bound_ones():
    capture = InductorCapture({})
    a, b = torch.zeros(4), torch.arange(4.0)
    _compiled(_add, capture)(a, b)
    capture.bind([None, b, a], 0)  # the caller's order, with a None
    assert capture.picks is not None and sorted(capture.picks) == [1, 2]
    inputs = [[None, b, a][i] for i in capture.picks]
    assert capture.call(inputs)
    torch.testing.assert_close(a, 4 * b, rtol=0, atol=0)
    before = a.clone()
    for changed in (b.double(), torch.arange(8.0)[::2], torch.arange(5.0)):  # dtype, strides, sizes
        other = [changed if x is b else x for x in inputs]
        assert not capture.call(other)
    assert torch.equal(a, before), "a refused call ran"


def test_a_second_compile_rebinds_and_a_cached_call_keeps_the_binding():
    capture = InductorCapture({})
    fn = _compiled(_add, capture)
    a, b = torch.zeros(4), torch.ones(4)
    fn(a, b)
    capture.bind([a, b], 0)
    first = capture.graph
    fn(torch.zeros(4), torch.ones(4))  # Dynamo's cached graph: nothing new to bind
    capture.bind([a, b], capture.compiles)
    assert first is not None and capture.graph is first and capture.picks is not None
    c, d = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    before = capture.compiles
    fn(c, d)  # a recompile
    capture.bind([c, d], before)
    assert capture.graph is not None and capture.graph is not first
    assert capture.call([c, d]) and not capture.call([a, b])


def test_a_graph_break_leaves_it_unbound_for_good():
    def broken(a: torch.Tensor, b: torch.Tensor) -> None:
        a.add_(b)
        torch._dynamo.graph_break()
        a.mul_(2)

    capture = InductorCapture({})
    a, b = torch.zeros(4), torch.ones(4)
    _compiled(broken, capture)(a, b)
    capture.bind([a, b], 0)
    assert capture.broken and capture.picks is None and not capture.call([a, b])


def test_an_aliased_or_foreign_input_leaves_it_unbound():
    capture = InductorCapture({})
    a = torch.zeros(4)
    _compiled(_add, capture)(a, a)
    capture.bind([a, a], 0)
    assert capture.picks is None and not capture.broken
    outside = torch.ones(4)

    def reads_a_global(x: torch.Tensor) -> None:
        x.add_(outside)

    capture = InductorCapture({})
    _compiled(reads_a_global, capture)(a)
    capture.bind([a], 0)
    assert capture.picks is None


def test_without_dynamos_tensor_check_the_graph_stays_unbound(monkeypatch):
    # another torch build without torch._C._dynamo.guards.TensorGuards: every call goes through torch.compile
    monkeypatch.setattr(direct_call, "TensorGuards", None)
    capture = InductorCapture({})
    a, b = torch.zeros(4), torch.ones(4)
    _compiled(_add, capture)(a, b)
    capture.bind([a, b], 0)
    assert capture.picks is None and not capture.call([a, b])
    assert torch.equal(a, 2 * b), "the call through torch.compile ran once, the refused call not at all"


def _same_values_other_strides(opt: GSGD, model: torch.nn.Module) -> None:
    w = next(p for p in model.parameters() if p.dim() == 2)
    w.grad = w.grad.t().contiguous().t()  # column-major: Dynamo would recompile for it


def _lr(opt: GSGD, model: torch.nn.Module) -> None:
    for g in opt.param_groups:
        g["lr"] *= 0.5


def _load_state(opt: GSGD, model: torch.nn.Module) -> None:
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))


# name -> (change before step CHANGE_AT, whether that step runs without Dynamo, graphs compiled for it
# by each optimizer: a scheduler's lr and a checkpoint's state compile nothing, new strides do)
CASES = {
    "nothing": (lambda opt, model: None, True, 0),
    "lr": (_lr, False, 0),  # the replay is rebuilt, through torch.compile
    "load_state_dict": (_load_state, False, 0),
    "gradient_strides": (_same_values_other_strides, False, 1),  # the guards refuse it
}
CHANGE_AT = 3
STEPS = 6


def _step_twins(direct, through, model, twin, x, change, state_keys, monkeypatch) -> tuple[list[bool], int]:
    """Step ``direct`` (which may call the graph without Dynamo) and ``through`` (never) on the same
    gradients, ``change`` made to both before step CHANGE_AT, checking after every step that the weights,
    the state tensors ``state_keys`` and the counters agree bit for bit; counts the graphs compiled
    after step 1; returns, per step, whether ``direct`` ran its graph without Dynamo, and those graphs."""
    calls: list[bool] = []
    call = InductorCapture.call

    def recording(self: InductorCapture, inputs: list[torch.Tensor]) -> bool:
        calls.append(call(self, inputs))
        return calls[-1]

    monkeypatch.setattr(InductorCapture, "call", recording)
    used: list[bool] = []
    graphs = 0
    for k in range(STEPS):
        for m, o in ((model, direct), (twin, through)):
            o.zero_grad()
            m(x).square().mean().backward()
            if k == CHANGE_AT:
                change(o, m)
            o.step()
            if o is direct:
                used.append(any(calls))
                calls.clear()
        if k == 1:  # compiled at step 0 (new state), rebuilt with the state's tensors at step 1
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        for (n, a), b in zip(model.named_parameters(), twin.parameters()):
            assert torch.equal(a, b), f"step {k}: {n}"
            for key in state_keys:
                assert torch.equal(direct.state[a][key], through.state[b][key]), f"step {k}: {key} of {n}"
        for counter in ("steps", "skipped_steps", "guard_hits"):
            assert int(getattr(direct, counter)) == int(getattr(through, counter)), counter
    assert int(direct.skipped_steps) == 0 and int(direct.steps) == STEPS
    return used, torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs


def _check_use(used: list[bool], direct_at_change: bool) -> None:
    assert used[:CHANGE_AT] == [False, False, True], "never without Dynamo before the change: the case proves nothing"
    assert used[CHANGE_AT] is direct_at_change, f"step {CHANGE_AT}: without Dynamo {used[CHANGE_AT]}"
    assert used[-1], "never without Dynamo after the change"


# The cases beyond "nothing" and the guards' refusal compile more graphs: slow (CI runs them).
_SLOW_CASES = {"lr", "load_state_dict"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in _SLOW_CASES else c for c in CASES])
def test_the_step_without_dynamo_equals_the_step_through_torch_compile(case, monkeypatch):
    change, direct_at_change, recompiles = CASES[case]
    model, x = make("mlp_unequal", dtype=torch.float32)
    initialize(model, detect_topology(model, x), "skeleton_rescaled")
    twin = copy.deepcopy(model)
    h = dict(lr=1e-2, momentum=0.9, weight_decay=1e-3)
    direct = GSGD(model.parameters(), topology=detect_topology(model, x), compiled=True, **h)
    through = GSGD(twin.parameters(), topology=detect_topology(twin, x), compiled=True, **h)
    through._graph_replay = lambda: False  # type: ignore[method-assign]  # rebuilt through torch.compile
    used, graphs = _step_twins(direct, through, model, twin, x, change, ("momentum_buffer",), monkeypatch)
    assert graphs == 2 * recompiles  # each optimizer compiles its own
    _check_use(used, direct_at_change)


# name -> (change before step CHANGE_AT, whether that step runs without Dynamo, graphs compiled for it)
ADAM_CASES = {
    "nothing": (lambda opt, model: None, True, 0),
    "lr": (_lr, True, 0),  # GAdam's replay takes a scheduler's lr in new tables: same graph, same inputs
    "gradient_strides": (_same_values_other_strides, False, 1),
}


@pytest.mark.parametrize("case", [c if c == "nothing" else pytest.param(c, marks=pytest.mark.slow) for c in ADAM_CASES])
def test_gadamw_without_dynamo_equals_gadamw_through_torch_compile(case, monkeypatch):
    change, direct_at_change, recompiles = ADAM_CASES[case]
    model, x = make("mlp_unequal", dtype=torch.float32)
    initialize(model, detect_topology(model, x), "skeleton_rescaled")
    twin = copy.deepcopy(model)
    direct = GAdamW(model.parameters(), lr=1e-3, topology=detect_topology(model, x), compiled=True)
    through = GAdamW(twin.parameters(), lr=1e-3, topology=detect_topology(twin, x), compiled=True)
    through._compiled_step.replay = lambda *args: False  # type: ignore[method-assign]
    used, graphs = _step_twins(direct, through, model, twin, x, change, ("exp_avg", "exp_avg_sq"), monkeypatch)
    assert graphs == 2 * recompiles
    _check_use(used, direct_at_change)
