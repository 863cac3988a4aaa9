"""Acceptance: every zoo model gets the chains it must have, with torch.fx and with the recorder."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_gsgd import TopologyError, detect_topology
from tests.zoo import ZOO, make

METHODS = ["auto", "record"]


def _coverage(model: nn.Module, chains: list[tuple[str, ...]]) -> float:
    """Share of parameters in the named layers, counted from the modules themselves."""
    total = sum(p.numel() for p in model.parameters())
    inside = sum(p.numel() for chain in chains for name in chain for p in model.get_submodule(name).parameters())
    return inside / total


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_chains_and_coverage(name, method):
    entry = ZOO[name]
    model, x = make(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    topo = detect_topology(model, x, allow_empty=True, method=method)
    got = [tuple(layer.name for layer in chain.layers) for chain in topo.chains]
    assert got == entry.chains
    assert sorted(layer.name for layer in topo.normalized) == sorted(entry.alone)
    assert topo.coverage == pytest.approx(_coverage(model, entry.chains + [entry.alone, entry.tied]), abs=1e-12)
    tied = [n.rsplit(".", 1)[0] for c in topo.chains for layer in c.layers for n in layer.tied_names]
    assert sorted(set(tied)) == sorted(entry.tied)
    # the detector restores everything it touched
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    excluded = {e.name: e.reason for e in topo.excluded}
    inside = sum(got, ()) + entry.alone + entry.tied
    assert set(excluded) == {n for n, p in model.named_parameters() if n.rsplit(".", 1)[0] not in inside}
    for pname, fragment in entry.notes.items():
        assert fragment in excluded[pname], (pname, excluded[pname])


def test_fx_fallback_to_recorder():
    model, x = make("dynamic")
    with pytest.raises(Exception, match="control flow"):
        detect_topology(model, x, method="fx")
    topo = detect_topology(model, x)  # auto falls back to the recorder
    assert [len(c.layers) for c in topo.chains] == [3]


@pytest.mark.parametrize("name", ["gelu_mlp", "layernorm_mlp"])
def test_no_chain_raises_with_reasons(name):
    model, x = make(name)
    with pytest.raises(TopologyError, match="no ReLU chain found") as info:
        detect_topology(model, x)
    assert "fc1" in str(info.value)
    with pytest.raises(TopologyError, match=r"coverage 0\.0% is below min_coverage=50\.0%") as info:
        detect_topology(model, x, min_coverage=0.5)
    assert "fc2.weight" in str(info.value)


def test_min_coverage_passes_and_fails():
    model, x = make("resnet")
    detect_topology(model, x, min_coverage=0.9)
    with pytest.raises(TopologyError, match="below min_coverage") as info:
        detect_topology(model, x, min_coverage=0.95)
    assert "layer2.0.shortcut.0.weight" in str(info.value)


def test_include_exclude():
    model, x = make("functional_mlp")
    topo = detect_topology(model, x, exclude=["fc3"])
    assert [tuple(layer.name for layer in c.layers) for c in topo.chains] == [("fc1", "fc2"), ("fc4", "fc5")]
    assert "excluded by exclude=" in {e.name: e.reason for e in topo.excluded}["fc3.weight"]
    topo = detect_topology(model, x, include=["fc[345]"])
    assert [tuple(layer.name for layer in c.layers) for c in topo.chains] == [("fc3", "fc4", "fc5")]
    with pytest.raises(TopologyError, match="'fc9' matches no Linear/Conv layer"):
        detect_topology(model, x, exclude=["fc9"])


def test_frozen_layer_is_left_out():
    model, x = make("functional_mlp")
    model.fc2.weight.requires_grad_(False)
    topo = detect_topology(model, x)
    assert [tuple(layer.name for layer in c.layers) for c in topo.chains] == [("fc3", "fc4", "fc5")]
    assert "frozen" in {e.name: e.reason for e in topo.excluded}["fc2.weight"]


def test_summary_reports_chains_units_paths_and_exclusions():
    model, x = make("functional_mlp")
    text = repr(detect_topology(model, x))
    # widths 5-7-6-8-4-3: weights 35+42+48+32+12 = 169, hidden biases 7+6+8+4 = 25, hidden units 25, output bias 3
    assert "widths 5-7-6-8-4-3" in text
    assert "hidden units 25" in text
    assert "169 basis paths" in text
    assert "coverage 100.0% (197 of 197 parameters)" in text
    model, x = make("layernorm_mlp")
    text = detect_topology(model, x, allow_empty=True).summary()
    assert "coverage 0.0%" in text
    assert "fc2.weight (36 params): 'fc2' is in no ReLU chain (after it: LayerNorm 'ln2'" in text
    model, x = make("reuse_mlp")
    text = detect_topology(model, x).summary()
    assert "shared.weight (16 params): 'shared': shared weight: module 'shared' is called 2 times" in text
