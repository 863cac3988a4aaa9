"""The G-SGD authors' BatchNorm heuristic: the pure update, its detection mode and the dispatch."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lightning_gsgd import GSGD, detect_topology
from lightning_gsgd.step.bn_heuristic import bn_heuristic_direction, bn_heuristic_step
from tests.zoo import make


def _ref_direction(w: torch.Tensor, g: torch.Tensor, centre: int) -> torch.Tensor:
    """Entry by entry, as gsgd-math.md section 7 states it."""
    n_out, n_in, taps = w.shape
    out = torch.empty_like(g)
    for o in range(n_out):
        for t in range(taps):
            norm = sum(float(w[o, i, t]) ** 2 for i in range(n_in)) ** 0.5
            for i in range(n_in):
                skeleton = t == centre and i == o % n_in
                out[o, i, t] = g[o, i, t] / norm if skeleton else g[o, i, t] * norm
    return out


@pytest.mark.parametrize("shape,centre", [((4, 3, 9), 4), ((3, 5, 1), 0), ((6, 6, 4), 2)])
def test_direction_matches_the_rule(shape, centre):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    grad = torch.randn(shape, generator=g, dtype=torch.float64)
    w0, grad0 = w.clone(), grad.clone()
    got = bn_heuristic_direction(w, grad, centre)
    assert torch.allclose(got, _ref_direction(w, grad, centre), rtol=1e-13, atol=0)
    assert torch.equal(w, w0) and torch.equal(grad, grad0)  # inputs untouched


def test_step_momentum_nesterov_weight_decay():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 3, 9, generator=g, dtype=torch.float64)
    hp = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=True)
    buf = None
    ref_w, ref_buf = w.clone(), None
    for _ in range(3):
        grad = torch.randn(4, 3, 9, generator=g, dtype=torch.float64)
        w, buf = bn_heuristic_step(w, grad, buf, 4, **hp)
        d = _ref_direction(ref_w, grad + 0.01 * ref_w, 4)
        ref_buf = d.clone() if ref_buf is None else 0.9 * ref_buf + d
        ref_w = ref_w - 0.1 * (d + 0.9 * ref_buf)
        assert torch.allclose(w, ref_w, rtol=1e-12, atol=1e-14)
    same, none = bn_heuristic_step(w, torch.randn_like(w), None, 4, lr=0.0)
    assert torch.equal(same, w) and none is None


def test_detection_modes():
    model, x = make("resnet_bn")
    assert not detect_topology(model, x, allow_empty=True).bn_layers
    topo = detect_topology(model, x, bn_mode="authors_heuristic")
    names = [layer.name for layer in topo.bn_layers]
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert names == convs  # stem, both convs of every block and the shortcut projection
    assert topo.coverage == 0.0 and not topo.chains
    assert "BatchNorm heuristic of the G-SGD authors" in topo.summary()
    assert topo.total_params == sum(p.numel() for p in model.parameters())
    assert ("layer2.0.shortcut.0.weight (bn heuristic)", (6, 4, 1, 1)) in topo.fingerprint()
    with pytest.raises(ValueError, match="bn_mode"):
        detect_topology(model, x, bn_mode="heuristic")


def test_gsgd_dispatches_bn_layers_and_sgd_for_the_rest():
    model, x = make("plainnet_bn")
    topo = detect_topology(model, x, bn_mode="authors_heuristic")
    ref = copy.deepcopy(model)
    y = torch.randint(0, 3, (x.shape[0],))
    hp = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
    opt = GSGD(model.parameters(), topology=topo, **hp)
    sgd = torch.optim.SGD(ref.parameters(), **hp)
    bn_names = {layer.name + ".weight" for layer in topo.bn_layers}
    assert len(bn_names) == 5
    bufs: dict[str, torch.Tensor] = {}
    for _ in range(2):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for m, o in ((model, opt), (ref, sgd)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        sgd.step()
        for n, p in model.named_parameters():
            if n in bn_names:
                w = before[n].flatten(2)
                d = _ref_direction(w, grads[n].flatten(2) + 1e-3 * w, 4)
                bufs[n] = d if n not in bufs else 0.9 * bufs[n] + d
                assert torch.allclose(p.flatten(2), w - 0.05 * bufs[n], rtol=1e-12, atol=1e-15), n
                ref.get_parameter(n).data.copy_(p)  # keep the SGD twin in step for the next round
            else:
                assert torch.allclose(p, ref.get_parameter(n), rtol=1e-12, atol=1e-15), n
