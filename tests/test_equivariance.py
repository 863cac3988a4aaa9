"""Acceptance 2: G-SGD is equivariant under positive per-unit rescaling; torch SGD is not.

From ``w`` and from ``g_c(w)`` (every hidden unit's incoming weights and bias times ``c``, outgoing
weights divided by ``c``: the same function) 20 steps with momentum and weight decay on the same
batches must give the same function. The same protocol with ``torch.optim.SGD`` is the negative
control: it must visibly disagree, which shows the comparison can tell the two apart.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_gsgd import GSGD, detect_topology, init_skeleton_, random_unit_factors, rescale_hidden_units_
from tests.models import MODELS, make
from tests.oracle import path_values

STEPS = 20
HYPER = dict(lr=0.02, momentum=0.9, weight_decay=0.01)
TOL = 1e-9


def _batches(x: torch.Tensor, out_dim: int, n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [
        (
            torch.randn(x.shape, dtype=x.dtype, generator=g),
            torch.randn(x.shape[0], out_dim, dtype=x.dtype, generator=g),
        )
        for _ in range(n)
    ]


def _train(model, x, batches, make_opt) -> torch.optim.Optimizer:
    opt = make_opt(model, detect_topology(model, x))
    for s in range(STEPS):
        xb, yb = batches[s % len(batches)]
        opt.zero_grad()
        ((model(xb) - yb) ** 2).mean().backward()
        opt.step()
    return opt


def _pair(name: str, spread: float):
    """The skeleton-initialized model and a randomly rescaled deep copy (same function)."""
    model, x = make(name)
    init_skeleton_(detect_topology(model, x))
    rescaled = copy.deepcopy(model)
    topo = detect_topology(rescaled, x)
    rescale_hidden_units_(topo, random_unit_factors(topo, spread, torch.Generator().manual_seed(5)))
    with torch.no_grad():
        before = (rescaled(x) - model(x)).abs().max() / model(x).abs().max()
    assert before <= 1e-14, "the rescaling changed the function: the test set-up is wrong"
    # the rescaling must actually move the weights, or the test proves nothing
    moved = max((a - b).abs().max() for a, b in zip(model.parameters(), rescaled.parameters()))
    assert moved > 0.1
    return model, rescaled, x


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize("spread", [1.0, 2.0])
@pytest.mark.parametrize("name", list(MODELS))
def test_gsgd_is_equivariant_under_unit_rescaling(name, spread):
    model, rescaled, x = _pair(name, spread)
    with torch.no_grad():
        batches = _batches(x, model(x).shape[1])
        start = model(x).clone()

    def gsgd(m, topo):
        return GSGD(m.parameters(), topology=topo, **HYPER)

    opt_a = _train(model, x, batches, gsgd)
    opt_b = _train(rescaled, x, batches, gsgd)
    assert int(opt_a.guard_hits) == 0 and int(opt_b.guard_hits) == 0, "the guard acted: lower the lr"
    with torch.no_grad():
        out_a, out_b = model(x), rescaled(x)
    assert _rel(out_a, start) > 0.1, "training barely moved the outputs: the comparison would be vacuous"
    assert _rel(out_a, out_b) <= TOL
    # Path values are gauge-free: they agree too, layer by layer (independent recursion of the oracle).
    for ca, cb in zip(detect_topology(model, x).chains, detect_topology(rescaled, x).chains):
        (va, ba), (vb, bb) = path_values(ca), path_values(cb)
        for l, (a, b) in enumerate(zip(va, vb)):
            assert _rel(a, b) <= TOL, f"chain {ca.name} layer {l}: path values differ"
        for a, b in zip(ba, bb):
            if a is not None:
                assert _rel(a, b) <= TOL


@pytest.mark.parametrize("name", list(MODELS))
def test_sgd_is_not_equivariant_negative_control(name):
    model, rescaled, x = _pair(name, 1.0)
    with torch.no_grad():
        batches = _batches(x, model(x).shape[1])

    def sgd(m, topo):
        return torch.optim.SGD(m.parameters(), **HYPER)

    _train(model, x, batches, sgd)
    _train(rescaled, x, batches, sgd)
    with torch.no_grad():
        rel = _rel(model(x), rescaled(x))
    assert rel > 1e7 * TOL, "plain SGD passed the equivariance test: the test cannot tell"
