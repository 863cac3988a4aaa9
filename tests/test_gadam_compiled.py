"""``GAdam(compiled=True)`` / ``GAdamW``: the whole G-Adam step as one torch.compile graph
(:mod:`lightning_gsgd.step.adam_graph`).

Checked against the float64 path-space oracle of test_gadam.py (torch's Adam/AdamW with autograd on
the basis-path values) with Inductor on two models and with Dynamo's ``eager`` backend (the same traced
graphs, run by torch) on every model and case; against the eager step for skipped steps, the guard, the
counters, per-layer groups and float32 rounding; checkpoint resume, schedulers without recompiling.
The default, the replay and the synchronization-free path are in test_gadam_compiled_default.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch import nn
from torch.func import functional_call

from lightning_gsgd import GAdam, GAdamW, detect_topology, init_skeleton_
from lightning_gsgd.step.adam_graph import AdamGraphs
from tests.models import MODELS, initialize, make
from tests.test_gadam import CASES, STEPS, _groups, _oracle


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _traced(opt: GAdam) -> GAdam:
    """Run the traced graph with torch's ops (Dynamo's eager backend): fast to build, the same graph."""
    opt._graphs = AdamGraphs(backend="eager", fullgraph=True)
    return opt


def _loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).square().mean()


def _against_oracle(name: str, init: str, case: str, backend: str | None) -> GAdam:
    _, cls, torch_cls, kw, special = next(c for c in CASES if c[0] == case)
    model, x = make(name)
    topo = detect_topology(model, x)
    initialize(model, topo, init)
    y = torch.randn(x.shape[0], model(x).shape[1], dtype=x.dtype, generator=torch.Generator().manual_seed(1))

    def loss_fn(out):
        return ((out - y) ** 2).mean()

    ours = copy.deepcopy(model)
    opt = cls(_groups(dict(ours.named_parameters()), special), topology=detect_topology(ours, x), compiled=True, **kw)
    if backend == "eager":
        _traced(opt)
    for _ in range(STEPS):
        opt.zero_grad()
        loss_fn(ours(x)).backward()
        opt.step()
    assert opt._graphs is not None and opt._graphs.compiled, "the graph never ran"
    assert int(opt.guard_hits) == 0 and int(opt.skipped_steps) == 0 and int(opt.steps) == STEPS
    ref = _oracle(model, topo, x, loss_fn, STEPS, torch_cls, kw, special)
    out_ref = functional_call(model, ref, (x,))
    assert (out_ref - model(x)).abs().max() > 1e-6, "the step did nothing: the comparison would be vacuous"
    with torch.no_grad():
        assert (ours(x) - out_ref).abs().max() / out_ref.abs().max() <= 1e-9
    for n, p in ours.named_parameters():
        assert torch.allclose(p, ref[n], rtol=1e-9, atol=1e-9 * ref[n].abs().max()), n
        assert float(opt.state[p]["step"]) == STEPS, n
    return opt


@pytest.mark.parametrize(
    ("name", "case"),
    [
        pytest.param("mlp_unequal", "adamw_groups", id="mlp-groups", marks=pytest.mark.slow),  # ~100 s compiling
        pytest.param("cnn", "adam_amsgrad", id="cnn-amsgrad", marks=pytest.mark.slow),  # ~10-20 s compiling
    ],
)
def test_inductor_kernels_match_the_oracle(name, case):
    _against_oracle(name, "skeleton_rescaled", case, backend=None)


# Every case on one model and one case on two more models in the default run; the rest is marked slow.
_DEFAULT = {"mlp_unequal"}
_DEFAULT_CASES = {("cnn", "adam_groups")}
EVERYWHERE = [
    pytest.param(
        name,
        case[0],
        marks=() if name in _DEFAULT or (name, case[0]) in _DEFAULT_CASES else pytest.mark.slow,
        id=f"{name}-{case[0]}",
    )
    for name in MODELS
    for case in CASES
]


@pytest.mark.parametrize(("name", "case"), EVERYWHERE)
def test_traced_graphs_match_the_oracle(name, case):
    _against_oracle(name, "skeleton_rescaled", case, backend="eager")


@pytest.mark.slow
@pytest.mark.parametrize("init", ["skeleton", "order_one"])
@pytest.mark.parametrize("name", list(MODELS))
def test_traced_graphs_match_the_oracle_from_other_inits(name, init):
    _against_oracle(name, init, "adamw_amsgrad_eps", backend="eager")


def _twins(model, x, make_opt, steps, hook=None):
    """A compiled (traced) and an eager optimizer on copies of ``model``, stepped on the same loss."""
    twin = copy.deepcopy(model)
    graph = _traced(make_opt(model, True))
    eager = make_opt(twin, False)
    for k in range(steps):
        for m, o in ((model, graph), (twin, eager)):
            o.zero_grad()
            _loss(m, x).backward()
            if hook is not None:
                hook(k, m)
            o.step()
    return twin, graph, eager


def _same_state(model, twin, graph, eager, rtol, atol) -> None:
    for (n, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=n)
        assert set(graph.state[a]) == set(eager.state[b]), n
        for key, t in eager.state[b].items():
            torch.testing.assert_close(graph.state[a][key], t, rtol=rtol, atol=atol, msg=f"{n} {key}")


def test_per_layer_groups_tensor_lr_amsgrad_and_the_guard_agree_with_the_eager_step():
    # one group per layer with different Adam forms, a tensor lr and an lr that makes the guard clamp
    model, x = make("mixed")
    initialize(model, detect_topology(model, x), "skeleton_rescaled")
    forms = [
        dict(lr=torch.tensor(0.05, dtype=torch.float64), amsgrad=True),
        dict(lr=0.8, weight_decay=0.01, betas=(0.5, 0.6)),
        dict(lr=0.02, decoupled_weight_decay=True, weight_decay=0.1, eps=1e-3),
        dict(lr=0.03, amsgrad=True, weight_decay=0.02),
    ]

    def make_opt(m, compiled):
        mods = [mod for mod in m.modules() if isinstance(mod, (nn.Linear, nn.Conv2d))]
        groups = [dict(params=list(mod.parameters()), **forms[i % len(forms)]) for i, mod in enumerate(mods)]
        return GAdam(groups, lr=0.01, topology=detect_topology(m, x), compiled=compiled, min_ratio=0.5)

    twin, graph, eager = _twins(model, x, make_opt, steps=4)
    assert graph._graphs.compiled, "the graph never ran"
    assert int(eager.guard_hits) > 0, "the guard never acted: that case proves nothing"
    for counter in ("steps", "skipped_steps", "guard_hits", "collapsed_steps"):
        assert int(getattr(graph, counter)) == int(getattr(eager, counter)), counter
    _same_state(model, twin, graph, eager, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "host_reads,where",
    [
        (None, "chain_weight"),
        (False, "output_bias"),
        pytest.param(None, "output_bias", marks=pytest.mark.slow),
        pytest.param(False, "chain_weight", marks=pytest.mark.slow),
    ],
)
def test_a_non_finite_gradient_skips_the_whole_compiled_step(where, host_reads):
    model, x = make("cnn")
    initialize(model, detect_topology(model, x), "skeleton_rescaled")
    names = [n for n, _ in model.named_parameters()]
    poisoned = names.index("3.0.weight") if where == "chain_weight" else len(names) - 1
    start = [p.detach().clone() for p in model.parameters()]

    def make_opt(m, compiled):
        opt = GAdamW(m.parameters(), lr=1e-2, amsgrad=True, topology=detect_topology(m, x), compiled=compiled)
        opt.host_reads = host_reads
        return opt

    def poison(k, m):
        if k in (0, 2):
            list(m.parameters())[poisoned].grad.view(-1)[1] = float("nan")

    first = copy.deepcopy(model)
    twin, graph, eager = _twins(first, x, make_opt, steps=1, hook=poison)
    for m in (first, twin):  # skipped: nothing moved
        assert all(torch.equal(a, b) for a, b in zip(m.parameters(), start))
    assert int(graph.skipped_steps) == 1 and int(graph.steps) == 0
    # the host path keeps no state for a skipped first step; the sync-free path keeps zeros and step 0
    assert len(graph.state) == len(eager.state) == (0 if host_reads is None else len(start))
    _same_state(first, twin, graph, eager, rtol=0, atol=0)
    twin, graph, eager = _twins(model, x, make_opt, steps=4, hook=poison)
    for counter in ("steps", "skipped_steps", "guard_hits", "collapsed_steps"):
        assert int(getattr(graph, counter)) == int(getattr(eager, counter)), counter
    assert int(graph.skipped_steps) == 2 and int(graph.steps) == 2
    _same_state(model, twin, graph, eager, rtol=1e-10, atol=1e-12)


def test_float32_agrees_with_the_eager_step_to_rounding():
    model, x = make("cnn", dtype=torch.float32)
    initialize(model, detect_topology(model, x), "skeleton_rescaled")
    start = [p.detach().clone() for p in model.parameters()]

    def make_opt(m, compiled):
        return GAdamW(m.parameters(), lr=1e-3, weight_decay=0.1, topology=detect_topology(m, x), compiled=compiled)

    twin, graph, eager = _twins(model, x, make_opt, steps=5)
    moved = max(float((p.detach() - s).abs().max() / s.abs().max()) for p, s in zip(twin.parameters(), start))
    assert moved > 1e-3, "the steps did nothing: the comparison would be vacuous"
    for a, b in zip(model.parameters(), twin.parameters()):  # a few float32 roundings, three decades below the step
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))


def test_bfloat16_parameters_step_within_bfloat16_rounding_of_float64():
    # bfloat16 weights and moments; the graph computes in float32 and rounds once per stored value
    model, x = make("cnn", dtype=torch.float32)
    initialize(model, detect_topology(model, x), "skeleton")
    model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)
    ref, x64 = copy.deepcopy(model).double(), x.double()
    start = [p.detach().clone() for p in ref.parameters()]
    for m, xx, compiled in ((model, x, True), (ref, x64, False)):
        opt = GAdamW(m.parameters(), lr=1e-2, amsgrad=True, topology=detect_topology(m, xx), compiled=compiled)
        if compiled:
            _traced(opt)
        for _ in range(3):
            opt.zero_grad()
            _loss(m, xx).float().backward()
            opt.step()
        assert int(opt.steps) == 3
    assert max(float((r.detach() - s).abs().max()) for r, s in zip(ref.parameters(), start)) > 0.02
    for p, r in zip(model.parameters(), ref.parameters()):
        assert p.dtype == torch.bfloat16
        # u = 2**-8 (bfloat16's unit roundoff): per step one rounding of the stored weight and one of its
        # row rescale (3 steps: 4u with the start's), and a direction off by a few u in steps of about lr
        torch.testing.assert_close(p.detach().double(), r.detach(), rtol=4 * 2**-8, atol=3 * 1e-2 * 4 * 2**-8)


@pytest.mark.parametrize("cls", [pytest.param(GAdam, marks=pytest.mark.slow), GAdamW])
def test_checkpoint_resume_is_bit_identical(cls):
    model, x = make("cnn")
    init_skeleton_(detect_topology(model, x))

    def opt_for(m, **kw):
        return _traced(cls(m.parameters(), lr=1e-3, amsgrad=True, compiled=True, **kw))

    def run(m, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            _loss(m, x).backward()
            opt.step()

    a = copy.deepcopy(model)
    run(a, opt_for(a, topology=detect_topology(a, x)), 6)
    b = copy.deepcopy(model)
    opt_b = opt_for(b, topology=detect_topology(b, x))
    run(b, opt_b, 3)
    saved = copy.deepcopy({"model": b.state_dict(), "opt": opt_b.state_dict()})
    c = copy.deepcopy(model)
    c.load_state_dict(saved["model"])
    opt_c = opt_for(c)
    opt_c.load_state_dict(saved["opt"])
    opt_c.bind(detect_topology(c, x))
    run(c, opt_c, 3)
    assert int(opt_c.steps) == 6
    for p, q in zip(a.parameters(), c.parameters()):
        assert torch.equal(p, q)


def test_a_scheduler_and_the_step_count_change_nothing_in_the_graph(monkeypatch):
    # the lr halves every step: new hyper-parameter tables for the replay, the same graph
    model, x = make("mlp_unequal")
    initialize(model, detect_topology(model, x), "skeleton")

    def make_opt(m, compiled):
        return GAdamW(m.parameters(), lr=1e-2, topology=detect_topology(m, x), compiled=compiled)

    twin = copy.deepcopy(model)
    opts = [_traced(make_opt(model, True)), make_opt(twin, False)]
    replays = []
    replay = opts[0]._compiled_step.replay
    monkeypatch.setattr(opts[0]._compiled_step, "replay", lambda *a: replays.append(replay(*a)) or replays[-1])
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in opts]
    graphs_before = None
    for k in range(5):
        for m, o, s in zip((model, twin), opts, scheds):
            o.zero_grad()
            _loss(m, x).backward()
            o.step()
            s.step()
        if k == 0:
            graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs_before and torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs_before
    assert len(opts[0]._graphs.compiled) == 1
    assert replays == [False, False, True, True, True]  # step 0 makes the state, step 1 builds the replay
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.slow  # ~5 s of compiling
def test_a_hidden_bias_without_gradient_is_rescaled_as_in_the_eager_step():
    model, x = make("mlp_unequal")
    initialize(model, detect_topology(model, x), "skeleton_rescaled")

    def drop(k, m):
        if k == 1:
            next(mod for mod in m.modules() if isinstance(mod, nn.Linear)).bias.grad = None

    def make_opt(m, compiled):
        return GAdam(m.parameters(), lr=1e-2, topology=detect_topology(m, x), compiled=compiled)

    twin, graph, eager = _twins(model, x, make_opt, steps=3, hook=drop)
    assert len(graph._graphs.compiled) == 2
    _same_state(model, twin, graph, eager, rtol=1e-10, atol=1e-12)
