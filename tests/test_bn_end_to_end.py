"""Detected BatchNorm segments, stepped (issue 15's acceptance): on ResNets with BasicBlocks and
Bottlenecks (projection shortcuts), a VGG-BN net with a BatchNorm1d MLP classifier, a DenseNet-style
block and ShuffleNet-V2 units (a DAG chain of BatchNorm affines), ``detect_topology``'s default exact
mode and ``GSGD`` commute with S1 and S2 jointly: from a copy rescaled by random S1 and S2 factors
(spread exp(U(-1, 1))), five steps with momentum and weight decay give the same training-mode function
to 1e-8 relative (float64, BatchNorm eps 1e-30). SGD and the authors' heuristic are the controls:
both move the function differently on the twin (measured, asserted > 1e-4).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_gsgd import GSGD, detect_topology, init_skeleton_
from lightning_gsgd.topology.skeleton import random_unit_factors, rescale_hidden_units_, rescale_normalized_rows_
from tests import bn_detect_models as bm

MODELS = {
    "resnet_basic": (bm.ResNetBasic, (4, 3, 8, 8)),
    "resnet_bottleneck": (bm.ResNetBottleneck, (4, 3, 8, 8)),
    "vgg_mlp": (bm.VggMlp, (4, 3, 6, 6)),
    "dense_bn": (bm.DenseBn, (4, 3, 6, 6)),
    "shuffle_bn": (bm.ShuffleBn, (4, 3, 6, 6)),
}
HP = dict(lr=0.01, momentum=0.9, weight_decay=1e-3)


def _build(name: str):
    cls, shape = MODELS[name]
    torch.manual_seed(0)
    model = bm.randomize_bn(cls().double()).train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eps = 1e-30
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    init_skeleton_(detect_topology(model, x))
    y = torch.randn(_fwd(model, x).shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    return model, x, y


@torch.no_grad()
def _rescale(model: nn.Module, x: torch.Tensor) -> None:
    """Random S1 factors on every detected unit, S2 factors on every detected S2 row (and its bias)."""
    topo = detect_topology(model, x)
    rescale_hidden_units_(topo, random_unit_factors(topo, 1.0, torch.Generator().manual_seed(5)))
    rescale_normalized_rows_(topo, 1.0, torch.Generator().manual_seed(6))


def _fwd(model: nn.Module, x: torch.Tensor, k: int = 99) -> torch.Tensor:
    torch.manual_seed(k)  # the same dropout masks for model and twin (VggMlp has dropout)
    return model(x)


def _run(model, x, y, make):
    opt = make(model)
    for k in range(5):
        opt.zero_grad()
        ((_fwd(model, x, k) - y) ** 2).mean().backward()
        opt.step()
    return opt


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _gsgd(bn_mode: str = "exact", compiled: bool = False):
    def make(m):
        return GSGD(m.parameters(), topology=detect_topology(m, X[0], bn_mode=bn_mode), compiled=compiled, **HP)

    return make


X: list[torch.Tensor] = []  # the current model's input, for the optimizer factories


@pytest.mark.parametrize("name", list(MODELS))
def test_detected_segments_step_equivariantly(name):
    model, x, y = _build(name)
    X[:] = [x]
    twin = copy.deepcopy(model)
    _rescale(twin, x)
    topo = detect_topology(model, x)
    assert topo.s1_units > 0 and topo.s2_rows > 0
    assert _rel(_fwd(twin, x), _fwd(model, x)) <= 1e-12, "the rescaling is not a symmetry"

    def gap(make):
        a, b = copy.deepcopy(model), copy.deepcopy(twin)
        oa, ob = _run(a, x, y, make), _run(b, x, y, make)
        moved = _rel(_fwd(a, x), _fwd(model, x))
        return _rel(_fwd(b, x), _fwd(a, x)), moved, oa, ob

    err, moved, oa, ob = gap(_gsgd())
    assert moved > 1e-3, "the steps did nothing: the comparison would be vacuous"
    assert int(oa.guard_hits) == int(ob.guard_hits) == 0 and int(oa.skipped_steps) == 0
    assert err <= 1e-8
    assert gap(lambda m: torch.optim.SGD(m.parameters(), **HP))[0] > 1e-4
    assert gap(_gsgd("authors_heuristic"))[0] > 1e-4
