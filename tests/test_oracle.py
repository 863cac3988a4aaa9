"""Acceptance 1: one or more GSGD steps equal the brute-force path-space oracle (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call

from lightning_gsgd import GSGD, detect_topology
from tests.models import INITS, MODELS, initialize, make
from tests.oracle import oracle_run


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize(
    "hyper,steps",
    [
        (dict(lr=1e-3), 1),
        (dict(lr=1e-3, momentum=0.9, weight_decay=0.01), 3),
        (dict(lr=1e-3, momentum=0.5, dampening=0.3, weight_decay=0.001), 3),
        (dict(lr=1e-3, momentum=0.9, nesterov=True), 3),
    ],
)
def test_step_matches_path_space_oracle(name, init, hyper, steps):
    model, x = make(name)
    topo = detect_topology(model, x)
    initialize(model, topo, init)
    if init == "order_one":
        # large weights give large path gradients: a smaller step keeps the guard out of play
        hyper = dict(hyper, lr=hyper["lr"] * 1e-2)
    y = torch.randn(x.shape[0], model(x).shape[1], dtype=x.dtype, generator=torch.Generator().manual_seed(1))

    def loss_fn(out):
        return ((out - y) ** 2).mean()

    ours = copy.deepcopy(model)
    opt = GSGD(ours.parameters(), topology=detect_topology(ours, x), **hyper)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(ours(x)).backward()
        opt.step()
    assert int(opt.guard_hits) == 0, "guard acted: the oracle does not model it"

    ref = oracle_run(model, topo, x, loss_fn, steps=steps, **hyper)
    out_ref = functional_call(model, ref, (x,))
    out = ours(x)
    moved = (out_ref - model(x)).abs().max()
    assert moved > 1e-6, "the step did nothing: the comparison would be vacuous"
    rel = (out - out_ref).abs().max() / out_ref.abs().max()
    assert rel <= 1e-10
    # same path values, layer by layer (sigma gauge on both sides, so same weights too)
    for n, p in ours.named_parameters():
        assert torch.allclose(p, ref[n], rtol=1e-10, atol=1e-12 * ref[n].abs().max()), n
