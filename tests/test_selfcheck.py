"""``invariance_error``: the one "rescale hidden units in place, compare outputs, restore exactly" check."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_gsgd import Chain, ChainLayer, Topology, detect_topology, invariance_error
from lightning_gsgd.topology.skeleton import random_unit_factors
from tests.models import make


def test_small_for_a_true_topology_and_restores_weights_and_modes():
    model, x = make("cnn", 0)
    topo = detect_topology(model, x)
    model.train()
    model[0].eval()  # a submodule the user keeps in eval mode must stay so (model.train() would flip it)
    modes = [m.training for m in model.modules()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = invariance_error(model, topo, x, spread=2.0, generator=torch.Generator().manual_seed(0))
    assert isinstance(r, float) and r < 1e-12
    assert [m.training for m in model.modules()] == modes
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_flags_a_wrong_chain_and_restores_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    a, b = model[0], model[2]
    wrong = Topology(
        (Chain((ChainLayer("0", a.weight, a.bias, 6, 4, 1, 0), ChainLayer("2", b.weight, b.bias, 3, 6, 1, 0))),)
    )
    before = [p.clone() for p in model.parameters()]
    r = invariance_error(model, wrong, x, spread=1.0, generator=torch.Generator().manual_seed(0))
    assert r > 1e-2
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


class _FailsOnSecondCall(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 2:  # the forward on the rescaled weights
            raise ValueError("boom")
        return self.inner(x)


def test_restores_weights_and_mode_when_forward_fails():
    inner, x = make("mlp_equal", 0)
    model = _FailsOnSecondCall(inner).train()
    topo = detect_topology(inner, x)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="boom"):
        invariance_error(model, topo, x)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(m.training for m in model.modules())


def test_same_seed_same_value_and_the_rescaling_is_real():
    model, x = make("mlp_unequal", 0)
    topo = detect_topology(model, x)
    runs = [invariance_error(model, topo, x, generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert runs[0] == runs[1]
    factors = random_unit_factors(topo, 1.0, torch.Generator().manual_seed(5))
    assert max(float((f.log().abs()).max()) for fs in factors for f in fs) > 0.5  # far from the identity
