"""``GSGD``'s in-place step equals the straightforward reference step of ``tests/reference_step.py``.

The oracle tests (test_oracle.py) pin the math on small nets but keep the guard out of play and use
one parameter group. Here the in-place step (``chain_step`` / ``chain_bulk``) is compared with the
reference implementation, which builds every quantity of gsgd-math.md sections 2-4 with full-size
masks, in the cases the oracle leaves out: the guard acting, a different momentum / Nesterov /
dampening / weight decay / learning rate per layer, a layer without gradient, float32.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_gsgd import GSGD, detect_topology, init_skeleton_, random_unit_factors, rescale_hidden_units_
from lightning_gsgd.step.hyper import Hyper
from lightning_gsgd.topology.index import chain_index
from tests.models import make
from tests.reference_step import gsgd_chain_step


class ReferenceGSGD:
    """G-SGD through ``gsgd_chain_step``; parameters outside chains (and output biases) by torch's SGD rule."""

    def __init__(self, model: nn.Module, topo, hyper_of: dict[int, Hyper], min_ratio: float) -> None:
        self.model, self.topo, self.hyper_of, self.min_ratio = model, topo, hyper_of, min_ratio
        self.bufs: dict[int, torch.Tensor] = {}
        self.hits = 0

    @torch.no_grad()
    def step(self) -> None:
        done: set[int] = set()
        for chain in self.topo.chains:
            layers = chain.layers
            index = chain_index(chain, torch.device("cpu"))
            ws = [layer.weight3d() for layer in layers]
            gs = [
                layer.weight3d(layer.weight.grad if layer.weight.grad is not None else torch.zeros_like(layer.weight))
                for layer in layers
            ]
            bs = [
                layer.bias if layer.bias is not None and layer.bias.grad is not None and hidden else None
                for layer, hidden in zip(layers, chain.hidden)
            ]
            gbs = [None if b is None else b.grad for b in bs]
            res = gsgd_chain_step(
                ws,
                gs,
                bs,
                gbs,
                [self.bufs.get(id(layer.weight)) for layer in layers],
                [None if b is None else self.bufs.get(id(b)) for b in bs],
                index,
                [self.hyper_of[id(layer.weight)] for layer in layers],
                [None if b is None else self.hyper_of[id(b)] for b in bs],
                self.min_ratio,
            )
            self.hits += int(res.guard_hits)
            for l, layer in enumerate(layers):
                ws[l].copy_(res.weights[l])
                done.add(id(layer.weight))
                if res.weight_bufs[l] is not None:
                    self.bufs[id(layer.weight)] = res.weight_bufs[l]
                if bs[l] is not None:
                    bs[l].copy_(res.biases[l])
                    done.add(id(bs[l]))
                    if res.bias_bufs[l] is not None:
                        self.bufs[id(bs[l])] = res.bias_bufs[l]
        for p in self.model.parameters():
            if id(p) in done or p.grad is None:
                continue
            hp = self.hyper_of[id(p)]
            d = p.grad.add(p, alpha=hp.weight_decay) if hp.weight_decay else p.grad
            if hp.momentum:
                old = self.bufs.get(id(p))
                buf = d.clone() if old is None else old.mul(hp.momentum).add_(d, alpha=1 - hp.dampening)
                self.bufs[id(p)] = buf
                d = d.add(buf, alpha=hp.momentum) if hp.nesterov else buf
            p.add_(d, alpha=-hp.lr)


def _groups(model: nn.Module, per_layer: list[dict]) -> list[dict]:
    """One parameter group per weight module, cycling through ``per_layer``; the rest in a last group."""
    mods = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    groups = [dict(params=list(m.parameters()), **per_layer[i % len(per_layer)]) for i, m in enumerate(mods)]
    taken = {id(p) for g in groups for p in g["params"]}
    rest = [p for p in model.parameters() if id(p) not in taken]
    if rest:
        groups.append(dict(params=rest))
    return groups


CASES = {
    # lr large enough that the guard clamps free tau path values in every model; after two such
    # steps the path values are so small that lr / v^2 amplifies rounding chaotically, so 2 steps
    "guard": (dict(lr=30.0, momentum=0.9, weight_decay=0.01), [{}]),
    "mixed_momentum": (dict(lr=1e-2), [dict(momentum=0.9), dict(momentum=0.0, weight_decay=0.05), dict(momentum=0.5)]),
    "mixed_nesterov": (
        dict(lr=1e-2, momentum=0.9),
        [dict(nesterov=True), dict(dampening=0.4, weight_decay=0.01), dict(lr=3e-3, nesterov=True, weight_decay=0.1)],
    ),
    "plain_per_layer_lr": (dict(lr=1e-2), [dict(lr=2e-2), dict(lr=5e-3, weight_decay=0.02)]),
}


def _run(name: str, case: str, *, dtype=torch.float64, init: str = "rescaled", drop_grad: str | None = None):
    defaults, per_layer = CASES[case]
    model, x = make(name, dtype=dtype)
    topo = detect_topology(model, x)
    init_skeleton_(topo)
    if init == "rescaled":
        rescale_hidden_units_(topo, random_unit_factors(topo, 1.0, torch.Generator().manual_seed(3)))
    ref_model = copy.deepcopy(model)
    y = torch.randn(x.shape[0], model(x).shape[1], dtype=dtype, generator=torch.Generator().manual_seed(1))
    opt = GSGD(_groups(model, per_layer), topology=topo, **defaults)
    hyper_of = {
        id(q): Hyper(g["lr"], g["momentum"], g["dampening"], g["weight_decay"], g["nesterov"])
        for g, rg in zip(opt.param_groups, _groups(ref_model, per_layer))
        for q in rg["params"]
    }
    ref = ReferenceGSGD(ref_model, detect_topology(ref_model, x), hyper_of, opt.defaults["min_ratio"])
    for _ in range(2 if case == "guard" else 4):
        for m in (model, ref_model):
            m.zero_grad(set_to_none=True)
            ((m(x) - y) ** 2).mean().backward()
            if drop_grad is not None:
                m.get_parameter(drop_grad).grad = None
        opt.step()
        ref.step()
    return model, ref_model, opt, ref


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    return bool(((a - b).abs() <= rtol * b.abs().max().clamp(min=1e-30)).all())


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", ["mlp_equal", "mlp_unequal", "cnn", "cnn1d", "mixed"])
def test_matches_reference(name, case):
    model, ref_model, opt, ref = _run(name, case)
    if case == "guard":
        assert int(opt.guard_hits) > 0, "the guard never acted: the case proves nothing"
    assert int(opt.guard_hits) == ref.hits
    assert int(opt.skipped_steps) == 0
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert _close(p, q, 1e-10), n
        buf, rbuf = opt.state[p].get("momentum_buffer"), ref.bufs.get(id(q))
        assert (buf is None) == (rbuf is None), n
        if buf is not None:
            assert _close(buf.view_as(rbuf), rbuf, 1e-9), n


def test_layer_without_gradient_matches_reference():
    model, ref_model, opt, _ = _run("mlp_unequal", "mixed_momentum", drop_grad="4.weight")
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert _close(p, q, 1e-10), n


@pytest.mark.parametrize("init", ["skeleton", "rescaled"])
def test_float32_matches_reference(init):
    model, ref_model, opt, ref = _run("cnn", "mixed_nesterov", dtype=torch.float32, init=init)
    assert int(opt.guard_hits) == ref.hits == 0
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert _close(p, q, 1e-5), n


def test_step_runs_under_deterministic_algorithms():
    """Lightning's ``Trainer(deterministic=True)`` turns this on; no op of the step may refuse it."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        model, ref_model, opt, _ = _run("cnn", "mixed_nesterov")
    finally:
        torch.use_deterministic_algorithms(was)
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert _close(p, q, 1e-10), n
