"""Issue 22: a layer joins a chain only if it provably computes the plain Linear/Conv map.

Every claim is checked by an oracle written here, independent of the library's rescaling code:
multiply each hidden unit's incoming weight rows and bias by a random ``c > 0``, divide the next
layer's input columns of that unit by ``c`` (found from the modules' own shapes), run the float64
model on inputs of scale ~10, and require the output to stay within 1e-10 (relative), before and
after the residual gains are moved from their initial values (0 included) to 0.7. The same oracle
applied to the layers that are left out shows that it can fail.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_gsgd import Topology, TopologyError, detect_topology

TOL = 1e-10
DT = torch.float64


# --------------------------------------------------------------------------- the oracle


def _units(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


@torch.no_grad()
def rescaled_change(model: nn.Module, pairs: list[tuple[str, str]], x: torch.Tensor, seed: int = 0) -> float:
    """Relative output change when the units between every ``(a, b)`` are rescaled (in place, restored).

    Only the modules' own ``weight``/``bias`` Parameters are touched; ``b`` reads ``a``'s units as
    input channels (conv) or as consecutive blocks of ``in_features / units`` features (Linear).
    """
    model.eval()
    ref = model(x)
    params = list(model.parameters())
    saved = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(seed)
    try:
        for a_name, b_name in pairs:
            a, b = model.get_submodule(a_name), model.get_submodule(b_name)
            n = _units(a)
            c = torch.exp(2 * torch.rand(n, generator=g, dtype=DT) - 1)
            a.weight.mul_(c.view(-1, *[1] * (a.weight.dim() - 1)))
            if a.bias is not None:
                a.bias.mul_(c)
            if isinstance(b, nn.Linear):
                b.weight.view(b.out_features, n, b.in_features // n).div_(c.view(1, -1, 1))
            else:
                b.weight.div_(c.view(1, -1, *[1] * (b.weight.dim() - 2)))
        out = model(x)
    finally:
        for p, s in zip(params, saved):
            p.copy_(s)
    return float((out - ref).abs().max() / ref.abs().max())


def claimed_pairs(topo: Topology) -> list[tuple[str, str]]:
    return [(a.name, b.name) for c in topo.chains for a, b in zip(c.layers[:-1], c.layers[1:])]


def assert_claims_invariant(model: nn.Module, topo: Topology, x: torch.Tensor) -> None:
    """All claimed units together, and each link alone, leave the output unchanged to 1e-10."""
    pairs = claimed_pairs(topo)
    for seed in range(3):
        assert rescaled_change(model, pairs, x, seed) <= TOL
    for pair in pairs:
        assert rescaled_change(model, [pair], x) <= TOL, pair


@torch.no_grad()
def move_gains(model: nn.Module, value: float = 0.7) -> None:
    for name, p in model.named_parameters():
        if name.split(".")[-1] == "gain":
            p.fill_(value)


def reason(topo: Topology, param: str) -> str:
    return next(e.reason for e in topo.excluded if e.name == param)


def big(*shape: int, seed: int = 1) -> torch.Tensor:
    return 10 * torch.randn(*shape, dtype=DT, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- layers


class PlainSubLinear(nn.Linear):
    """A subclass that only adds an attribute: computes exactly nn.Linear."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tag = "plain"


class PlainSubConv2d(nn.Conv2d):
    pass


class ClampLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).clamp(-20, 20)


def _standardize(w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """timm's ScaledStdConv2d weight: per output row, zero mean and unit variance."""
    flat = w.reshape(1, w.shape[0], -1)
    return F.batch_norm(flat, None, None, training=True, momentum=0.0, eps=eps).reshape_as(w)


class WSConv2d(nn.Conv2d):
    """Weight-standardized conv with a per-channel gain, as timm's ScaledStdConv2d."""

    def __init__(self, *args, gain_init: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.full((self.out_channels, 1, 1, 1), gain_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, _standardize(self.weight) * self.gain, self.bias)


class WSLinear(nn.Linear):
    def __init__(self, *args, gain_init: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.full((self.out_features, 1), gain_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, _standardize(self.weight) * self.gain, self.bias)


# --------------------------------------------------------------------------- models


class Head(nn.Module):
    def __init__(self, n_in: int, lin: type[nn.Linear] = nn.Linear) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = lin(n_in, 16), nn.Linear(16, 12), nn.Linear(12, 5)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(h)))))


class ConvBlock(nn.Module):
    """NF-ResNet-like residual branch 1x1 -> 3x3 -> 1x1; the last conv's gain starts at ``gain``."""

    def __init__(self, c: int, ws: bool, gain: float) -> None:
        super().__init__()
        self.ws = ws
        conv = WSConv2d if ws else nn.Conv2d
        self.conv1, self.conv2 = conv(c, c, 1), conv(c, c, 3, padding=1)
        if ws:
            self.conv3 = WSConv2d(c, c, 1, gain_init=gain)
        else:
            self.conv3 = nn.Conv2d(c, c, 1)
            self.gain = nn.Parameter(torch.tensor(gain))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))
        return x + (h if self.ws else self.gain * h)


class ConvNet(nn.Module):
    def __init__(self, ws: bool, gain: float, blocks: int = 2, head: bool = True) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.blocks = nn.Sequential(*[ConvBlock(6, ws, gain) for _ in range(blocks)])
        self.head = Head(6) if head else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(F.relu(self.stem(x)))
        h = F.adaptive_avg_pool2d(F.relu(h), 1).flatten(1)
        return self.head(h) if self.head is not None else h


class LinearBlock(nn.Module):
    def __init__(self, d: int, gain: float) -> None:
        super().__init__()
        self.fc_a, self.fc_b = WSLinear(d, 2 * d), WSLinear(2 * d, d, gain_init=gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc_b(F.relu(self.fc_a(x)))


class WSLinearNet(nn.Module):
    def __init__(self, gain: float) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.block = LinearBlock(8, gain)
        self.head = Head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.block(self.inp(x))))


def _mlp(first: nn.Module) -> nn.Sequential:
    return nn.Sequential(first, nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 5))


def _build(factory):
    torch.manual_seed(0)
    return factory().to(DT)


# --------------------------------------------------------------------------- the structural rule


def test_plain_subclasses_that_override_nothing_are_still_claimed():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = PlainSubConv2d(3, 5, 3)
            self.fc1, self.fc2 = PlainSubLinear(5, 7), nn.Linear(7, 4)

        def forward(self, x):
            h = F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1).flatten(1)
            return self.fc2(F.relu(self.fc1(h)))

    model = _build(Net)
    x = big(2, 3, 8, 8)
    topo = detect_topology(model, x)
    assert claimed_pairs(topo) == [("conv", "fc1"), ("fc1", "fc2")]
    assert topo.coverage == 1.0 and topo.untested == ()
    assert_claims_invariant(model, topo, x)


def test_a_clamping_linear_subclass_is_left_out_and_the_oracle_sees_why():
    model = _build(lambda: _mlp(ClampLinear(4, 16)))
    with torch.no_grad():
        model[0].weight.mul_(4)  # outputs well beyond the clamp on inputs of scale 10
    x = big(64, 4)
    topo = detect_topology(model, x)
    assert claimed_pairs(topo) == [("2", "4")]
    assert "ClampLinear overrides forward (a subclass of nn.Linear" in reason(topo, "0.weight")
    assert_claims_invariant(model, topo, x)
    assert rescaled_change(model, [("0", "2")], x) > 1e-3  # what the old detector claimed


@pytest.mark.parametrize("gain", [1.0, 0.0], ids=["live", "zero_gain"])
def test_weight_standardized_convs_are_left_out(gain):
    model = _build(lambda: ConvNet(ws=True, gain=gain))
    x = big(2, 3, 8, 8)
    topo = detect_topology(model, x)
    assert claimed_pairs(topo) == [("head.fc1", "head.fc2"), ("head.fc2", "head.fc3")]
    for b in range(2):
        for conv in ("conv1", "conv2", "conv3"):
            why = reason(topo, f"blocks.{b}.{conv}.weight")
            assert f"'blocks.{b}.{conv}': WSConv2d overrides forward" in why, why
    assert_claims_invariant(model, topo, x)
    move_gains(model)
    assert_claims_invariant(model, topo, x)
    # the links the old detector claimed inside each branch are not invariant once the gain is live
    assert rescaled_change(model, [("blocks.0.conv1", "blocks.0.conv2")], x) > 1e-3


@pytest.mark.parametrize("gain", [1.0, 0.0], ids=["live", "zero_gain"])
def test_weight_standardized_linears_are_left_out(gain):
    model = _build(lambda: WSLinearNet(gain))
    x = big(16, 4)
    topo = detect_topology(model, x)
    assert claimed_pairs(topo) == [("head.fc1", "head.fc2"), ("head.fc2", "head.fc3")]
    assert "'block.fc_a': WSLinear overrides forward" in reason(topo, "block.fc_a.weight")
    assert_claims_invariant(model, topo, x)
    move_gains(model)
    assert_claims_invariant(model, topo, x)
    assert rescaled_change(model, [("block.fc_a", "block.fc_b")], x) > 1e-3


def _weight_norm(m):
    return torch.nn.utils.parametrizations.weight_norm(m)


def _spectral_norm(m):
    return torch.nn.utils.parametrizations.spectral_norm(m)


def _old_weight_norm(m):
    return torch.nn.utils.weight_norm(m)


def _old_spectral_norm(m):
    return torch.nn.utils.spectral_norm(m)


def _hooked(m):
    m.register_forward_hook(lambda mod, args, out: out.clamp(-20, 20))
    return m


def _pre_hooked(m):
    m.register_forward_pre_hook(lambda mod, args: (args[0].clamp(-5, 5),))
    return m


WRAPPED = {
    "weight_norm": (_weight_norm, "Linear has a parametrization (weight_norm on 'weight')"),
    "spectral_norm": (_spectral_norm, "Linear has a parametrization (spectral_norm on 'weight')"),
    "old_weight_norm": (_old_weight_norm, "Linear has a forward pre-hook (torch.nn.utils.weight_norm)"),
    "old_spectral_norm": (_old_spectral_norm, "Linear has a forward pre-hook (torch.nn.utils.spectral_norm)"),
    "forward_hook": (_hooked, "Linear has a forward hook (_hooked.<locals>.<lambda>)"),
    "forward_pre_hook": (_pre_hooked, "Linear has a forward pre-hook (_pre_hooked.<locals>.<lambda>)"),
}


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("kind", list(WRAPPED))
def test_parametrized_and_hooked_layers_are_left_out(kind):
    wrap, why = WRAPPED[kind]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 16),
        nn.ReLU(),
        wrap(nn.Linear(16, 12).to(DT)),
        nn.ReLU(),
        nn.Linear(12, 8),
        nn.ReLU(),
        nn.Linear(8, 5),
    ).to(DT)
    x = big(32, 4)
    topo = detect_topology(model, x)
    assert claimed_pairs(topo) == [("4", "6")]
    left = [e for e in topo.excluded if e.name.startswith("2.")]
    assert left and all(why in e.reason for e in left), [e.reason for e in left]
    assert all(e.name != "2.weight" or "parametrization" not in e.reason for e in left)
    assert_claims_invariant(model, topo, x)


def test_a_global_forward_hook_leaves_every_layer_out():
    model = _build(lambda: _mlp(nn.Linear(4, 16)))
    handle = torch.nn.modules.module.register_module_forward_hook(lambda mod, args, out: None)
    try:
        topo = detect_topology(model, big(8, 4), allow_empty=True)
    finally:
        handle.remove()
    assert topo.chains == ()
    assert "a global module forward hook is registered" in reason(topo, "2.weight")
    assert detect_topology(model, big(8, 4)).chains  # the hook is gone


# --------------------------------------------------------------------------- the self-check is not vacuous


@pytest.mark.parametrize("blocks,head", [(1, False), (2, True)], ids=["forward_passes", "gradient_screen"])
def test_a_zero_gain_branch_of_plain_convs_is_claimed_but_reported_untested(blocks, head, caplog):
    model = _build(lambda: ConvNet(ws=False, gain=0.0, blocks=blocks, head=head))
    x = big(2, 3, 8, 8)
    with caplog.at_level(logging.WARNING, logger="lightning_gsgd"):
        topo = detect_topology(model, x)
    branch = [(f"blocks.{b}.conv1", f"blocks.{b}.conv2") for b in range(blocks)]
    expected = [p for b in range(blocks) for p in (branch[b], (branch[b][1], f"blocks.{b}.conv3"))]
    assert claimed_pairs(topo)[: 2 * blocks] == expected
    silent = tuple(n for b in range(blocks) for n in (f"blocks.{b}.conv1", f"blocks.{b}.conv2"))
    assert topo.untested == silent  # the head's units are live: tested
    assert "not tested by the self-check" in topo.summary() and "blocks.0.conv2" in topo.summary()
    assert any("cannot test the hidden units of" in r.getMessage() for r in caplog.records)
    assert_claims_invariant(model, topo, x)
    move_gains(model)
    assert_claims_invariant(model, topo, x)
    live = detect_topology(model, x)
    assert claimed_pairs(live) == claimed_pairs(topo) and live.untested == ()


def test_dead_units_are_reported_untested():
    model = _build(lambda: _mlp(nn.Linear(4, 16)))
    with torch.no_grad():
        model[0].bias.fill_(-1e3)  # every unit of layer 0 is zero after the ReLU on this input
    topo = detect_topology(model, big(8, 4))
    assert claimed_pairs(topo) == [("0", "2"), ("2", "4")]
    assert topo.untested == ("0",)


def test_a_live_model_has_nothing_untested():
    model = _build(lambda: ConvNet(ws=False, gain=0.7))
    topo = detect_topology(model, big(2, 3, 8, 8))
    assert topo.untested == () and "not tested" not in topo.summary()
    assert detect_topology(model, big(2, 3, 8, 8), self_check=False).untested == ()


# --------------------------------------------------------------------------- self-check failures drop links


class TanhInside(nn.Module):
    def __init__(self, first_tanh: bool) -> None:
        super().__init__()
        self.first_tanh = first_tanh
        self.fc1, self.fc2, self.fc3, self.fc4 = nn.Linear(4, 9), nn.Linear(9, 8), nn.Linear(8, 7), nn.Linear(7, 3)

    def forward(self, x):
        h = self.fc1(x)
        h = torch.tanh(h) if self.first_tanh else F.relu(h)
        h = self.fc2(h)
        h = F.relu(h) if self.first_tanh else torch.tanh(h)
        return self.fc4(F.relu(self.fc3(h)))


@pytest.fixture
def tanh_is_homogeneous(monkeypatch):
    """Simulate a detector bug: tanh passes as positively homogeneous, so only the self-check can catch it."""
    import lightning_gsgd.topology.detect as det

    real = det.transition
    monkeypatch.setattr(
        det, "transition", lambda op, layout, shape: layout if op.name == "tanh" else real(op, layout, shape)
    )


def test_a_failing_link_splits_the_chain_and_the_rest_is_kept(tanh_is_homogeneous, caplog):
    model = _build(lambda: TanhInside(first_tanh=False))
    x = big(16, 4)
    unchecked = detect_topology(model, x, self_check=False)
    assert claimed_pairs(unchecked) == [("fc1", "fc2"), ("fc2", "fc3"), ("fc3", "fc4")]
    with caplog.at_level(logging.WARNING, logger="lightning_gsgd"):
        topo = detect_topology(model, x)
    assert claimed_pairs(topo) == [("fc1", "fc2"), ("fc3", "fc4")]
    assert topo.coverage == 1.0
    assert any("between 'fc2' and 'fc3'" in r.getMessage() for r in caplog.records)
    assert_claims_invariant(model, topo, x)


def test_a_layer_left_alone_by_a_failing_link_goes_to_plain_sgd_with_the_reason(tanh_is_homogeneous):
    model = _build(lambda: TanhInside(first_tanh=True))
    x = big(16, 4)
    topo = detect_topology(model, x)
    assert claimed_pairs(topo) == [("fc2", "fc3"), ("fc3", "fc4")]
    assert topo.chains[0].layers[0].n_in == 9 and topo.chains[0].layers[0].taps == 1
    why = reason(topo, "fc1.weight")
    assert why.startswith("'fc1': the self-check found that rescaling the units between 'fc1' and 'fc2' changed")
    assert reason(topo, "fc1.bias") == why
    assert_claims_invariant(model, topo, x)


def test_nothing_left_after_the_self_check_is_refused_unless_allow_empty(tanh_is_homogeneous):
    class AllTanh(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(5, 3)

        def forward(self, x):
            return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))

    model = _build(AllTanh)
    with pytest.raises(TopologyError, match="(?s)self-check failed in chain 0 .*at layer 'fc1'.*No chain passes"):
        detect_topology(model, big(8, 4))
    topo = detect_topology(model, big(8, 4), allow_empty=True)
    assert topo.chains == () and len(topo.excluded) == 6
    with pytest.raises(TopologyError, match="below min_coverage"):
        detect_topology(model, big(8, 4), allow_empty=True, min_coverage=0.5)
