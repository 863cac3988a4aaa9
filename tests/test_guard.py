"""The guard against tau path values flipped through zero, and the skip of non-finite steps."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_gsgd import GSGD, detect_topology, init_skeleton_
from tests.models import make
from tests.oracle import path_values

MIN_RATIO = 0.01


def _free_tau_values(topo) -> torch.Tensor:
    """Path values of the free tau edges, by the rule of gsgd-math.md section 2: hidden node ``a``
    (input ``a`` of layer l >= 1) has its tau edge ``(a mod n_out <- a)`` at the centre tap; it is
    free unless it is also the sigma edge of its row, ``(b <- b mod n_in)`` in a hidden layer."""
    out = []
    for chain in topo.chains:
        vw, _ = path_values(chain)  # independent recursion over nodes (tests/oracle.py)
        last = len(chain.layers) - 1
        for l in range(1, last + 1):
            layer = chain.layers[l]
            rows = [a % layer.n_out for a in range(layer.n_in)]
            free = [a for a in range(layer.n_in) if l == last or a != rows[a] % layer.n_in]
            out += [vw[l][rows[a], a, layer.centre] for a in free]
    return torch.stack(out)


@pytest.mark.parametrize("name", ["mlp_unequal", "cnn", "mixed"])
def test_huge_lr_is_guarded(name):
    model, x = make(name)
    topo = detect_topology(model, x)
    init_skeleton_(topo)
    y = torch.randn(x.shape[0], model(x).shape[1], dtype=x.dtype, generator=torch.Generator().manual_seed(1))
    opt = GSGD(model.parameters(), lr=100.0, momentum=0.9, topology=topo, min_ratio=MIN_RATIO)
    for step in range(2):
        old = _free_tau_values(topo)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        assert int(opt.skipped_steps) == 0 and int(opt.steps) == step + 1
        for p in model.parameters():
            assert torch.isfinite(p).all()
        ratio = _free_tau_values(topo) / old
        assert (ratio > 0).all(), "a free tau path value changed sign"
        assert (ratio >= MIN_RATIO * (1 - 1e-12)).all(), "a free tau path value shrank past min_ratio"
    assert int(opt.guard_hits) > 0, "lr = 100 never triggered the guard: the test proves nothing"


OUTSIDE_AND_INSIDE = ["0.weight", "0.bias", "2.bias", "4.weight", "8.weight"]


def _batches(x, out_dim):
    g = torch.Generator().manual_seed(4)
    return [
        (torch.randn(x.shape, dtype=x.dtype, generator=g), torch.randn(x.shape[0], out_dim, dtype=x.dtype, generator=g))
        for _ in range(3)
    ]


def _backward(model, batch) -> None:
    xb, yb = batch
    ((model(xb) - yb) ** 2).mean().backward()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", OUTSIDE_AND_INSIDE)
def test_non_finite_gradient_skips_the_whole_step(where, bad):
    model, x = make("mixed")
    init_skeleton_(detect_topology(model, x))
    reference = copy.deepcopy(model)
    batches = _batches(x, model(x).shape[1])
    hyper = dict(lr=0.05, momentum=0.9, weight_decay=0.01)
    opt = GSGD(model.parameters(), topology=detect_topology(model, x), **hyper)
    ref_opt = GSGD(reference.parameters(), topology=detect_topology(reference, x), **hyper)

    opt.zero_grad()
    _backward(model, batches[0])
    opt.step()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    bufs = {n: opt.state[p]["momentum_buffer"].clone() for n, p in model.named_parameters()}

    opt.zero_grad()
    _backward(model, batches[1])
    dict(model.named_parameters())[where].grad.view(-1)[1] = bad
    opt.step()
    assert int(opt.skipped_steps) == 1 and int(opt.steps) == 1
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} changed in a skipped step"
        assert torch.equal(opt.state[p]["momentum_buffer"], bufs[n]), f"{n}: momentum changed in a skipped step"

    # the next finite step proceeds as if the bad one never happened
    opt.zero_grad()
    _backward(model, batches[2])
    opt.step()
    for b in (batches[0], batches[2]):
        ref_opt.zero_grad()
        _backward(reference, b)
        ref_opt.step()
    assert int(opt.steps) == 2 and int(opt.skipped_steps) == 1
    for (n, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), n
        assert not torch.equal(p, before[n]), f"{n} did not move in the step after the skipped one"
