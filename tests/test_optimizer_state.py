"""Acceptance 4: bit-identical resume, refusal of foreign state, the closure contract, LR schedulers,
and per-layer parameter groups (checked against the oracle with its leaves grouped the same way)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.func import functional_call

from lightning_gsgd import (
    GSGD,
    TopologyError,
    detect_topology,
    init_skeleton_,
    random_unit_factors,
    rescale_hidden_units_,
)
from lightning_gsgd.step.graph import ChainGraphs
from tests.models import make
from tests.oracle import PathParameterization

HYPER = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
NAN_AT = 2  # this step gets a NaN gradient and is skipped


def _batches(x: torch.Tensor, out_dim: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    return [
        (torch.randn(x.shape, dtype=x.dtype, generator=g), torch.randn(x.shape[0], out_dim, dtype=x.dtype, generator=g))
        for _ in range(n)
    ]


def _run(model, opt, batches, steps: range) -> None:
    for s in steps:
        xb, yb = batches[s]
        opt.zero_grad()
        ((model(xb) - yb) ** 2).mean().backward()
        if s == NAN_AT:
            next(model.parameters()).grad.view(-1)[0] = float("nan")
        opt.step()


def _gsgd(params, compiled: bool, **kwargs) -> GSGD:
    opt = GSGD(params, compiled=compiled, **kwargs, **HYPER)
    if compiled:  # the compiled graph, traced and run by torch (Inductor's kernels: test_compiled.py)
        opt._graphs = ChainGraphs(backend="eager", fullgraph=True)
    return opt


def _fresh(name: str):
    """The same architecture with other weights (they are overwritten by the checkpoint)."""
    model, x = make(name, seed=99)
    return model, x


@pytest.mark.parametrize(
    "name,bind_after_load,compiled",
    [
        pytest.param(
            n,
            b,
            c,
            id=f"{n}-{'bind_after_load' if b else 'bound'}-{'compiled' if c else 'eager'}",
            marks=pytest.mark.slow if c and n == "mixed" else (),
        )  # compiled on "mixed": ~5 s each
        for n in ("cnn", "mixed")
        for b in (False, True)
        for c in (False, True)
    ],
)
def test_resume_is_bit_identical(name, bind_after_load, compiled):
    model, x = make(name)
    init_skeleton_(detect_topology(model, x))
    start = copy.deepcopy(model.state_dict())
    batches = _batches(x, model(x).shape[1], 10)

    full = _gsgd(model.parameters(), compiled, topology=detect_topology(model, x))
    _run(model, full, batches, range(10))
    assert int(full.skipped_steps) == 1 and int(full.steps) == 9

    half_model, _ = _fresh(name)
    half_model.load_state_dict(start)
    half = _gsgd(half_model.parameters(), compiled, topology=detect_topology(half_model, x))
    _run(half_model, half, batches, range(5))
    buf = io.BytesIO()
    torch.save({"model": half_model.state_dict(), "optimizer": half.state_dict()}, buf)
    counters_at_save = (int(half.steps), int(half.skipped_steps), int(half.guard_hits))
    del half_model, half

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed_model, _ = _fresh(name)
    resumed_model.load_state_dict(ckpt["model"])
    if bind_after_load:  # the Lightning order: the optimizer exists, state is loaded, then it is bound
        resumed = _gsgd(resumed_model.parameters(), compiled)
        resumed.load_state_dict(ckpt["optimizer"])
        resumed.bind(detect_topology(resumed_model, x))
    else:
        resumed = _gsgd(resumed_model.parameters(), compiled, topology=detect_topology(resumed_model, x))
        resumed.load_state_dict(ckpt["optimizer"])
    assert (int(resumed.steps), int(resumed.skipped_steps), int(resumed.guard_hits)) == counters_at_save
    _run(resumed_model, resumed, batches, range(5, 10))

    assert int(full.guard_hits) > 0, "the guard never acted: its counter is not exercised"
    for counter in ("steps", "skipped_steps", "guard_hits"):
        assert torch.equal(resumed.counters()[counter], full.counters()[counter]), counter
    if compiled:
        assert full._graphs.compiled and resumed._graphs.compiled, "the compiled graph never ran"
    ref = dict(model.named_parameters())
    for n, p in resumed_model.named_parameters():
        assert torch.equal(p, ref[n]), n
        assert torch.equal(resumed.state[p]["momentum_buffer"], full.state[ref[n]]["momentum_buffer"]), n


def _two_layer(hidden: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 3)).double()


def _saved_state(model: nn.Module, x: torch.Tensor) -> dict:
    opt = GSGD(model.parameters(), topology=detect_topology(model, x), lr=0.1, momentum=0.9)
    model(x).pow(2).mean().backward()
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_state_of_another_topology_is_refused():
    # Same number of parameter tensors, other shapes: torch's own check would let this through.
    x = torch.randn(2, 4, dtype=torch.float64)
    state = _saved_state(_two_layer(5), x)
    other = _two_layer(6)
    opt = GSGD(other.parameters(), topology=detect_topology(other, x), lr=0.1, momentum=0.9)
    with pytest.raises(TopologyError, match="different topology"):
        opt.load_state_dict(state)
    unbound = GSGD(other.parameters(), lr=0.1, momentum=0.9)
    unbound.load_state_dict(state)
    with pytest.raises(TopologyError, match="different topology"):
        unbound.bind(detect_topology(other, x))
    # the matching model loads it
    same = _two_layer(5)
    GSGD(same.parameters(), topology=detect_topology(same, x), lr=0.1, momentum=0.9).load_state_dict(state)


# ----------------------------------------------------------------------------- closure contract


def test_step_runs_closure_with_grad_enabled_and_returns_its_loss():
    model, x = make("mlp_unequal")
    twin = copy.deepcopy(model)
    opt = GSGD(model.parameters(), lr=1e-3, momentum=0.9, topology=detect_topology(model, x))
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert calls == [True]
    assert isinstance(loss, torch.Tensor) and torch.equal(loss, twin(x).pow(2).mean())

    # the same step without a closure returns None and lands on the same weights
    twin_opt = GSGD(twin.parameters(), lr=1e-3, momentum=0.9, topology=detect_topology(twin, x))
    twin(x).pow(2).mean().backward()
    assert twin_opt.step() is None
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    assert not torch.equal(next(model.parameters()), make("mlp_unequal")[0][0].weight), "the step did nothing"


# ----------------------------------------------------------------------------- LR schedulers


def _lr_run(name: str, lrs_by_hand: list[float] | None, scheduler=None, steps: int = 6):
    model, x = make(name)
    init_skeleton_(detect_topology(model, x))
    batches = _batches(x, model(x).shape[1], steps)
    opt = GSGD(model.parameters(), lr=0.05, momentum=0.5, topology=detect_topology(model, x))
    sched = scheduler(opt) if scheduler is not None else None
    for s in range(steps):
        if lrs_by_hand is not None:
            for group in opt.param_groups:
                group["lr"] = lrs_by_hand[s]
        xb, yb = batches[s]
        opt.zero_grad()
        ((model(xb) - yb) ** 2).mean().backward()
        opt.step()
        if sched is not None:
            sched.step()
    return model


# the lr each scheduler sets, written out in the same float operations (StepLR chains its products)
STEP_LRS = [0.05, 0.05, 0.05 * 0.1, 0.05 * 0.1, 0.05 * 0.1 * 0.1, 0.05 * 0.1 * 0.1]
LAMBDA_LRS = [0.05 * (1.0 / (1 + s)) for s in range(6)]


@pytest.mark.parametrize(
    "scheduler,lrs",
    [
        (lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.1), STEP_LRS),
        (lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)), LAMBDA_LRS),
    ],
    ids=["StepLR", "LambdaLR"],
)
def test_scheduler_sets_the_effective_lr(scheduler, lrs):
    scheduled = _lr_run("mixed", None, scheduler)
    by_hand = _lr_run("mixed", lrs)
    constant = _lr_run("mixed", None)
    for (n, p), q in zip(scheduled.named_parameters(), by_hand.parameters()):
        assert torch.equal(p, q), n
    assert any(not torch.equal(p, c) for p, c in zip(scheduled.parameters(), constant.parameters()))


# ----------------------------------------------------------------------------- per-layer groups


@pytest.mark.parametrize("name", ["mlp_unequal", "cnn", "mixed"])
def test_per_layer_param_groups_match_the_oracle(name):
    model, x = make(name)
    topo = detect_topology(model, x)
    init_skeleton_(topo)
    rescale_hidden_units_(topo, random_unit_factors(topo, 1.0, torch.Generator().manual_seed(3)))
    y = torch.randn(x.shape[0], model(x).shape[1], dtype=x.dtype, generator=torch.Generator().manual_seed(1))

    def loss_fn(out):
        return ((out - y) ** 2).mean()

    # one group per module, lr 1e-3, 2e-3, ... (weight and bias of a module share a group)
    owners: dict[str, list[str]] = {}
    for n, _ in model.named_parameters():
        owners.setdefault(n.rsplit(".", 1)[0], []).append(n)
    lrs = {owner: 1e-3 * (1 + i) for i, owner in enumerate(owners)}
    hyper = dict(momentum=0.9, weight_decay=0.01)

    ours = copy.deepcopy(model)
    named = dict(ours.named_parameters())
    opt = GSGD(
        [{"params": [named[n] for n in names], "lr": lrs[o]} for o, names in owners.items()],
        topology=detect_topology(ours, x),
        **hyper,
    )
    pp = PathParameterization(model, topo)
    leaves = pp.named_leaves()
    ref_opt = torch.optim.SGD(
        [{"params": [leaves[n] for n in names], "lr": lrs[o]} for o, names in owners.items()], **hyper
    )
    for _ in range(3):
        opt.zero_grad()
        loss_fn(ours(x)).backward()
        opt.step()
        ref_opt.zero_grad()
        loss_fn(pp.forward(x)).backward()
        ref_opt.step()
    assert int(opt.guard_hits) == 0
    ref = {k: v.detach() for k, v in pp.weights().items()}
    with torch.no_grad():
        out, out_ref = ours(x), functional_call(model, ref, (x,))
        assert (out_ref - model(x)).abs().max() > 1e-6, "the step did nothing"
    assert (out - out_ref).abs().max() / out_ref.abs().max() <= 1e-10
    for n, p in ours.named_parameters():
        assert torch.allclose(p, ref[n], rtol=1e-10, atol=1e-12 * ref[n].abs().max()), n
