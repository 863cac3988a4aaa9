"""Bad input gets a clear error that names the argument or the layer at fault."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_gsgd import GSGD, TopologyError, detect_topology
from tests.models import make


def _model():
    model, x = make("mlp_unequal")
    return model, x, detect_topology(model, x)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=-0.1), r"lr=-0\.1"),
        (dict(lr=torch.tensor(-0.1)), r"lr="),
        (dict(lr=torch.tensor([0.1, 0.2])), r"tensor lr must have exactly one element"),
        (dict(momentum=-0.5), r"momentum=-0\.5"),
        (dict(weight_decay=-1e-4), r"weight_decay=-0\.0001"),
        (dict(dampening=-0.1), r"dampening=-0\.1"),
        (dict(dampening=1.5), r"dampening=1\.5"),
        (dict(nesterov=True), r"nesterov=True requires momentum > 0"),
        (dict(nesterov=True, momentum=0.9, dampening=0.1), r"nesterov=True requires .* dampening = 0"),
        (dict(min_ratio=0.0), r"min_ratio=0\.0"),
        (dict(min_ratio=1.0), r"min_ratio=1\.0"),
        (dict(min_ratio=-0.5), r"min_ratio=-0\.5"),
        (dict(min_ratio=2.0), r"min_ratio=2\.0"),
    ],
)
def test_bad_hyper_parameters_are_refused(kwargs, match):
    model, _, topo = _model()
    with pytest.raises(ValueError, match=match):
        GSGD(model.parameters(), **{"lr": 0.1, **kwargs}, topology=topo)


@pytest.mark.parametrize(
    "group,match",
    [(dict(lr=-1.0), r"param group 1: .*lr=-1\.0"), (dict(momentum=-0.9), r"param group 1: .*momentum=-0\.9")],
)
def test_bad_hyper_parameters_in_a_param_group_are_refused(group, match):
    model, _, topo = _model()
    params = list(model.parameters())
    with pytest.raises(ValueError, match=match):
        GSGD([{"params": params[:2]}, {"params": params[2:], **group}], lr=0.1, topology=topo)
    opt = GSGD([{"params": params[:2]}], lr=0.1)
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": params[2:], **group})


def test_topology_of_another_model_is_refused_naming_the_layer():
    model, _, _ = _model()
    other, x = make("mlp_unequal", seed=1)
    with pytest.raises(TopologyError, match=r"weight of layer '0' is not among this optimizer's parameters"):
        GSGD(model.parameters(), lr=0.1, topology=detect_topology(other, x))
    with pytest.raises(TopologyError, match=r"layer '0'"):
        GSGD(model.parameters(), lr=0.1).bind(detect_topology(other, x))


@pytest.mark.parametrize("missing", ["4.weight", "6.bias"])
def test_parameters_missing_from_the_optimizer_are_named(missing):
    model, _, topo = _model()
    kind, layer = missing.split(".")[1], missing.split(".")[0]
    params = [p for n, p in model.named_parameters() if n != missing]
    with pytest.raises(TopologyError, match=rf"the {kind} of layer '{layer}' is not among"):
        GSGD(params, lr=0.1, topology=topo)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("when", ["before the first step", "after two steps"])
def test_a_channels_last_conv_weight_is_refused_naming_the_layer(compiled, when):
    from lightning_gsgd.step.graph import ChainGraphs

    model, x = make("cnn")
    opt = GSGD(model.parameters(), lr=1e-3, momentum=0.9, topology=detect_topology(model, x), compiled=compiled)
    opt._graphs = ChainGraphs(backend="eager", fullgraph=True)
    for k in range(3):
        if k == (0 if when == "before the first step" else 2):
            model.to(memory_format=torch.channels_last)
        opt.zero_grad()
        model(x).square().mean().backward()
        if k < (0 if when == "before the first step" else 2):
            opt.step()
            continue
        conv = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1))
        with pytest.raises(TopologyError, match=rf"weight of layer '{conv}' is not contiguous"):
            opt.step()
        break


def test_frozen_chain_parameter_is_refused():
    model, _, topo = _model()
    model[2].weight.requires_grad_(False)
    with pytest.raises(TopologyError, match=r"weight of layer '2' is frozen"):
        GSGD(model.parameters(), lr=0.1, topology=topo)


def test_unbound_step_says_how_to_bind():
    model, x, topo = _model()
    opt = GSGD(model.parameters(), lr=0.1)
    assert not opt.is_bound
    model(x).sum().backward()
    with pytest.raises(RuntimeError, match=r"not bound.*detect_topology.*bind\(topology\)"):
        opt.step()
    opt.bind(topo)
    assert opt.is_bound
    opt.step()
    assert int(opt.steps) == 1


def test_sequential_broken_by_gelu_is_refused():
    model = nn.Sequential(nn.Linear(4, 5), nn.GELU(), nn.Linear(5, 3))
    x = torch.randn(2, 4)
    with pytest.raises(TopologyError, match=r"GELU"):
        detect_topology(model, x)
    topo = detect_topology(model, x, allow_empty=True)
    assert topo.chains == ()
    assert [e.name for e in topo.excluded] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert topo.coverage == 0.0
    assert "GELU" in topo.summary()
