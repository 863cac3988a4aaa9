"""Acceptance: G-SGD on detected chains is invariant to rescaling, and the self-check proves chains.

For every zoo model with chains, 10 G-SGD steps from ``w`` and from a random positive rescaling of
the detected hidden units give the same outputs (float64), while plain SGD does not. The self-check
must catch deliberately wrong topologies and name the layer at fault.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from lightning_gsgd import (
    GSGD,
    Chain,
    ChainLayer,
    Topology,
    TopologyError,
    check_invariance,
    detect_topology,
    init_skeleton_,
    random_unit_factors,
    rescale_hidden_units_,
)
from lightning_gsgd.topology.graph import call_model
from tests.zoo import ZOO, make

WITH_CHAINS = [n for n, e in ZOO.items() if e.chains]


def _outputs(model: nn.Module, x) -> list[torch.Tensor]:
    model.eval()
    with torch.no_grad():
        out = [t for t in tree_flatten(call_model(model, x))[0] if isinstance(t, torch.Tensor)]
    model.train()
    return out


def _train(model: nn.Module, x, make_opt, steps: int = 10) -> None:
    targets = [torch.randn_like(t, generator=None) for t in _outputs(model, x)]
    opt = make_opt(model)
    model.train()
    for step in range(steps):
        torch.manual_seed(100 + step)  # same dropout masks in both runs
        opt.zero_grad()
        outs = [t for t in tree_flatten(call_model(model, x))[0] if isinstance(t, torch.Tensor)]
        loss = sum(((o - t) ** 2).mean() for o, t in zip(outs, targets))
        loss.backward()
        opt.step()


def _rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((p - q).abs().max() / q.abs().max().clamp_min(1e-300)) for p, q in zip(a, b))


def _pair(name: str):
    model, x = make(name)
    init_skeleton_(detect_topology(model, x))  # G-SGD diverges from default init (gsgd-math.md section 5)
    scaled = copy.deepcopy(model)
    topo = detect_topology(scaled, x)
    rescale_hidden_units_(topo, random_unit_factors(topo, 1.5, torch.Generator().manual_seed(7)))
    assert _rel(_outputs(scaled, x), _outputs(model, x)) < 1e-12, "rescaling must not change the function"
    return model, scaled, x


@pytest.mark.parametrize("name", WITH_CHAINS)
def test_gsgd_steps_are_invariant_to_rescaling(name):
    model, scaled, x = _pair(name)
    start = _outputs(model, x)

    def gsgd(m):
        return GSGD(m.parameters(), lr=2e-3, momentum=0.9, weight_decay=1e-3, topology=detect_topology(m, x))

    torch.manual_seed(0)
    _train(model, x, gsgd)
    torch.manual_seed(0)
    _train(scaled, x, gsgd)
    a, b = _outputs(model, x), _outputs(scaled, x)
    assert _rel(a, start) > 1e-4, "the steps barely moved: the comparison would be vacuous"
    assert all(bool(t.isfinite().all()) for t in a)
    assert _rel(b, a) < 1e-9


@pytest.mark.parametrize("name", WITH_CHAINS)
def test_plain_sgd_is_not_invariant(name):
    """The same comparison fails for plain SGD, so the test above can fail."""
    model, scaled, x = _pair(name)

    def sgd(m):
        return torch.optim.SGD(m.parameters(), lr=2e-3, momentum=0.9, weight_decay=1e-3)

    torch.manual_seed(0)
    _train(model, x, sgd)
    torch.manual_seed(0)
    _train(scaled, x, sgd)
    assert _rel(_outputs(scaled, x), _outputs(model, x)) > 1e-6


def _copy_layer(layer: ChainLayer, weight: nn.Parameter | None = None, **kw) -> ChainLayer:
    fields = dict(
        name=layer.name,
        weight=layer.weight if weight is None else weight,
        bias=layer.bias,
        n_out=layer.n_out,
        n_in=layer.n_in,
        taps=layer.taps,
        centre=layer.centre,
    )
    fields.update(kw)
    return ChainLayer(**fields)


def _layer(model: nn.Module, name: str, n_in: int | None = None, taps: int | None = None) -> ChainLayer:
    m = model.get_submodule(name)
    if isinstance(m, nn.Linear):
        n_in, taps = n_in or m.in_features, taps or 1
        return ChainLayer(name, m.weight, m.bias, m.out_features, n_in, taps, taps // 2)
    k = m.weight[0, 0].numel()
    return ChainLayer(name, m.weight, m.bias, m.out_channels, m.in_channels, k, k // 2)


@pytest.mark.parametrize("name", WITH_CHAINS)
def test_self_check_catches_a_layer_not_in_the_chain(name):
    model, x = make(name)
    topo = detect_topology(model, x)
    chain = topo.chains[-1]
    last = chain.layers[-1]
    impostor = nn.Parameter(torch.randn_like(last.weight))  # same shape, not in the model
    wrong = Chain(chain.layers[:-1] + (_copy_layer(last, impostor, name="impostor"),))
    bad = Topology(topo.chains[:-1] + (wrong,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TopologyError, match=f"chain {len(topo.chains) - 1} .* at layer '{chain.layers[-2].name}'"):
        check_invariance(model, bad, x)
    for k, v in model.state_dict().items():  # restored bit for bit after the failure
        assert torch.equal(v, before[k]), k
    assert check_invariance(model, topo, x) < 1e-9


WRONG_CHAINS = {
    # through a non-homogeneous op
    "gelu_mlp": [("fc1", None, None), ("fc2", None, None)],
    "layernorm_mlp": [("fc1", None, None), ("fc2", None, None)],
    # through the residual add into the next block
    "resnet": [("layer1.0.conv1", None, None), ("layer1.0.conv2", None, None), ("layer1.1.conv1", None, None)],
    # into a module that is applied twice
    "reuse_mlp": [("fc2", None, None), ("shared", None, None)],
    # through BatchNorm
    "plainnet_bn": [("body.0", None, None), ("body.3", None, None)],
    # a Linear reading a channel-last flatten as if it were channel-major: wrong n_in/taps split
    "permuted_flatten": [("conv", None, None), ("fc", 3, 16)],
}


@pytest.mark.parametrize("name", list(WRONG_CHAINS))
def test_self_check_catches_hand_built_wrong_chains(name):
    model, x = make(name)
    # The check runs in eval mode, where a fresh BatchNorm (mean 0, var 1, bias 0) is linear and
    # so homogeneous: give it the statistics of a trained one (the detector rejects BN structurally).
    g = torch.Generator().manual_seed(5)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            for t in (m.running_mean, m.bias):
                t.data.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype))
    spec = WRONG_CHAINS[name]
    layers = tuple(_layer(model, n, a, t) for n, a, t in spec)
    with pytest.raises(TopologyError, match=f"at layer '{spec[-2][0]}'"):
        check_invariance(model, Topology((Chain(layers),)), x)


def test_self_check_runs_in_detect_topology(monkeypatch):
    """detect_topology refuses a topology its own self-check rejects (simulated detector bug)."""
    import lightning_gsgd.topology.detect as det

    model, x = make("gelu_mlp")
    monkeypatch.setattr(det, "transition", lambda op, layout, shape: layout)  # treat every op as homogeneous
    with pytest.raises(TopologyError, match="self-check failed in chain 0"):
        detect_topology(model, x)
    assert detect_topology(model, x, self_check=False).chains  # the bad chains, unchecked
