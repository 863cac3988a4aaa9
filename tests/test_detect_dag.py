"""Issue 14, detection: DAG chains (fan-out, concatenation, chunk, channel shuffle) on hand-written models.

For each positive case the exact ``Chain.sources`` and ``Chain.hidden`` are checked (with torch.fx
and with the recorder), and the self-check passes in float64: a random positive rescaling of every
claimed hidden unit, compensated in every column of every layer that reads it, leaves the outputs
unchanged. A deliberately wrong compensation must fail it. Negative cases: a unit whose output also
reaches an identity add, the model output or a non-homogeneous op is not hidden, with the reason.
The optimizer step on DAG chains is not tested here (the step engine is generalized separately).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_gsgd.topology.detect as det
from lightning_gsgd import TopologyError, check_invariance, detect_topology, random_unit_factors, rescale_hidden_units_
from lightning_gsgd.topology.types import Chain, Source, Topology
from tests.dag_detect_models import DAG_MODELS, image

METHODS = ["auto", "record"]


def S(layer: int, start: int, stop: int, step: int = 1) -> Source:
    return Source(layer, range(start, stop, step))


def _shuffled_head() -> tuple[Source, ...]:
    """The head of the shuffle unit reads stem[0..3] and b[0..3] interleaved (cat, then 2-group shuffle)."""
    return tuple(s for j in range(4) for s in (S(0, j, j + 1), S(2, j, j + 1)))


# name: (layer names in order, hidden flags, sources per layer)
EXPECTED: dict[str, tuple[tuple[str, ...], tuple[bool, ...], tuple[tuple[Source, ...], ...]]] = {
    "fan_out_2_cat": (
        ("stem", "b1.0", "b2.0", "b1.1", "b2.1", "head"),
        (True, True, True, True, True, False),
        ((S(-1, 0, 3),), (S(0, 0, 4),), (S(1, 0, 3),), (S(0, 0, 4),), (S(3, 0, 5),), (S(2, 0, 5), S(4, 0, 5))),
    ),
    "fan_out_3_cat": (
        ("stem", "b1.0", "b2.0", "b1.1", "b2.1", "b1.2", "b2.2", "head"),
        (True,) * 7 + (False,),
        (
            (S(-1, 0, 3),),
            (S(0, 0, 4),),
            (S(1, 0, 3),),
            (S(0, 0, 4),),
            (S(3, 0, 5),),
            (S(0, 0, 4),),
            (S(5, 0, 2),),
            (S(2, 0, 5), S(4, 0, 5), S(6, 0, 5)),
        ),
    ),
    # the branch outputs are added, then the model output: they are output layers of the chain
    "fan_out_2_add": (
        ("stem", "b1.0", "b2.0", "b1.1", "b2.1"),
        (True, True, False, True, False),
        ((S(-1, 0, 3),), (S(0, 0, 4),), (S(1, 0, 3),), (S(0, 0, 4),), (S(3, 0, 5),)),
    ),
    "fan_out_3_add": (
        ("stem", "b1.0", "b2.0", "b1.1", "b2.1", "b1.2", "b2.2"),
        (True, True, False, True, False, True, False),
        ((S(-1, 0, 3),), (S(0, 0, 4),), (S(1, 0, 3),), (S(0, 0, 4),), (S(3, 0, 5),), (S(0, 0, 4),), (S(5, 0, 2),)),
    ),
    "concat_two": (
        ("p1", "p2", "conv", "fc"),
        (True, True, True, False),
        ((S(-1, 0, 3),), (S(-1, 0, 3),), (S(0, 0, 4), S(1, 0, 5)), (S(2, 0, 6),)),
    ),
    "fire": (
        ("stem", "fire1.squeeze", "fire1.e1", "fire1.e3", "fire2.squeeze", "fire2.e1", "fire2.e3", "classifier.1"),
        (True,) * 7 + (False,),
        (
            (S(-1, 0, 3),),
            (S(0, 0, 6),),
            (S(1, 0, 3),),
            (S(1, 0, 3),),
            (S(2, 0, 4), S(3, 0, 5)),
            (S(4, 0, 2),),
            (S(4, 0, 2),),
            (S(5, 0, 3), S(6, 0, 3)),
        ),
    ),
    "inception": (
        ("stem", "b1", "b2a", "b2b", "b3a", "b3b", "b4", "head", "fc"),
        (True,) * 8 + (False,),
        (
            (S(-1, 0, 3),),
            (S(0, 0, 6),),
            (S(0, 0, 6),),
            (S(2, 0, 3),),
            (S(0, 0, 6),),
            (S(4, 0, 2),),
            (S(0, 0, 6),),  # through the 3x3 max-pool
            (S(1, 0, 2), S(3, 0, 4), S(5, 0, 3), S(6, 0, 2)),
            (S(7, 0, 5),),
        ),
    ),
    "dense_block": (
        ("stem", "layers.0.conv1", "layers.0.conv2", "layers.1.conv1", "layers.1.conv2", "layers.2.conv1")
        + ("layers.2.conv2", "transition", "fc"),
        (True,) * 8 + (False,),
        (
            (S(-1, 0, 3),),
            (S(0, 0, 4),),
            (S(1, 0, 4),),
            (S(0, 0, 4), S(2, 0, 2)),
            (S(3, 0, 4),),
            (S(0, 0, 4), S(2, 0, 2), S(4, 0, 2)),
            (S(5, 0, 4),),
            (S(0, 0, 4), S(2, 0, 2), S(4, 0, 2), S(6, 0, 2)),
            (S(7, 0, 5),),
        ),
    ),
    **{
        f"shuffle_{how}": (
            ("stem", "a", "b", "head"),
            (True, True, True, False),
            ((S(-1, 0, 3),), (S(0, 4, 8),), (S(1, 0, 4),), _shuffled_head()),
        )
        for how in ("view", "module", "functional")
    },
}


def _detect(name: str, method: str = "auto") -> tuple[nn.Module, torch.Tensor, Topology]:
    torch.manual_seed(0)
    model = DAG_MODELS[name]().double()
    x = image()
    return model, x, detect_topology(model, x, method=method)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(EXPECTED))
def test_dag_chain_sources_and_self_check(name, method):
    model, x, topo = _detect(name, method)
    names, hidden, sources = EXPECTED[name]
    assert len(topo.chains) == 1, topo.summary()
    chain = topo.chains[0]
    assert tuple(layer.name for layer in chain.layers) == names
    assert chain.hidden == hidden
    assert chain.sources == sources
    assert not chain.is_sequence
    assert topo.coverage == 1.0 and not topo.untested
    assert check_invariance(model, topo, x) <= 1e-12
    assert check_invariance(model, topo, 10 * image(3, seed=4), spread=2.0) <= 1e-12


def test_rescaling_compensates_every_reader():
    """Each hidden node's factor divides every column that reads it, in every layer (fan-out)."""
    model, x, topo = _detect("fan_out_3_cat")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    factors = random_unit_factors(topo, 1.0, torch.Generator().manual_seed(3))
    rescale_hidden_units_(topo, factors)
    c_stem = factors[0][0]
    for k in range(3):  # the stem's 4 nodes are read by b1.0, b1.1, b1.2
        c_own = factors[0][1 + 2 * k]
        w = model.b1[k].weight
        want = before[f"b1.{k}.weight"] * c_own.view(-1, 1, 1, 1) / c_stem.view(1, -1, 1, 1)
        torch.testing.assert_close(w, want, rtol=1e-15, atol=0)
    w = model.head.weight  # reads b2.0 (5), b2.1 (5), b2.2 (5)
    cols = torch.cat([factors[0][2], factors[0][4], factors[0][6]])
    torch.testing.assert_close(w, before["head.weight"] / cols.view(1, -1, 1, 1), rtol=1e-15, atol=0)
    torch.testing.assert_close(model.head.bias, before["head.bias"], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["concat_two", "shuffle_view", "dense_block"])
def test_a_wrong_compensation_fails_the_self_check(name):
    """The same layers with the reader's columns attributed to the wrong nodes: the check must fail."""
    model, x, topo = _detect(name)
    chain = topo.chains[0]
    sources = list(chain.sources)
    last_reader = max(l for l, srcs in enumerate(sources) if len(srcs) > 1)
    sources[last_reader] = tuple(reversed(sources[last_reader]))  # the columns of two producers swapped
    wrong = Topology((Chain(chain.layers, tuple(sources)),))
    with pytest.raises(TopologyError, match="self-check failed in chain 0"):
        check_invariance(model, wrong, x)


def test_a_shuffle_read_in_plain_order_fails_the_self_check():
    model, x, topo = _detect("shuffle_view")
    chain = topo.chains[0]
    plain = (S(0, 0, 4), S(2, 0, 4))  # as if there were no shuffle
    wrong = Topology((Chain(chain.layers, chain.sources[:3] + (plain,)),))
    with pytest.raises(TopologyError, match="self-check failed"):
        check_invariance(model, wrong, x)


# --------------------------------------------------------------------------- not hidden, with the reason
class IdentityAdd(nn.Module):
    """c1's units reach an identity add (a residual), besides c2."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 5, 1), nn.Conv2d(5, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c1(x))
        return (self.c3(F.relu(self.c2(h))) + h).mean((2, 3))


class SecondOutput(nn.Module):
    """c1's units also reach the model output through a second route."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 5, 1), nn.Conv2d(5, 2, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.c1(x))
        return self.c3(F.relu(self.c2(h))).mean((2, 3)), h.mean((2, 3))


class SmoothBranch(nn.Module):
    """c1 feeds c2 directly and c3 through a non-homogeneous op; c2 and c3 are concatenated."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 3, 1), nn.Conv2d(4, 2, 1)
        self.act, self.head = act, nn.Conv2d(5, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c1(x))
        return self.head(F.relu(torch.cat([self.c2(h), self.c3(self.act(h))], 1))).mean((2, 3))


class MixedTaps(nn.Module):
    """A Linear reads the cat of two flattened maps of different sizes (36 and 9 entries per unit on a 6x6 input)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 2, 3, padding=1), nn.Linear(162, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.c1(x)).flatten(1)
        b = F.max_pool2d(F.relu(self.c2(x)), 2).flatten(1)
        return self.fc(torch.cat([a, b], 1))


class PartlyRead(nn.Module):
    """Only the first 4 of c1's 6 units are read (a slice)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(4, 5, 1), nn.Conv2d(5, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c1(x))[:, :4]
        return self.c3(F.relu(self.c2(h))).mean((2, 3))


NEGATIVE = {
    "identity add": (
        IdentityAdd,
        [("c2", "c3")],
        "c1.weight",
        "the output of relu has 2 consumers; on one route: add sums it with another tensor (e.g. a residual",
        "several consumers, one route: add sums it with another tensor",
    ),
    "second route to the model output": (
        SecondOutput,
        [("c2", "c3")],
        "c1.weight",
        "the output of relu has 2 consumers; on one route: model output",
        "several consumers, one route: the model's output layer",
    ),
    "sigmoid on one branch": (
        lambda: SmoothBranch(nn.Sigmoid()),
        [("c2", "c3", "head")],
        "c1.weight",
        "the output of relu has 2 consumers; on one route: Sigmoid 'act' is not positively homogeneous",
        "several consumers, one route: Sigmoid is not positively homogeneous",
    ),
    "gelu on one branch": (
        lambda: SmoothBranch(nn.GELU()),
        [("c2", "c3", "head")],
        "c1.weight",
        "on one route: GELU 'act' is not positively homogeneous",
        "several consumers, one route: GELU is not positively homogeneous",
    ),
    "pieces with different taps": (
        MixedTaps,
        [],
        "c1.weight",
        "cat joins pieces with 9 and 36 entries per unit (e.g. flattened maps of different sizes)",
        "cat joins pieces with different numbers of entries per unit",
    ),
    "units partly read": (
        PartlyRead,
        [("c2", "c3")],
        "c1.weight",
        "2 of its 6 units are read by no layer (sliced away or not used); all units of a layer are hidden or none",
        "some of its units are read by no layer",
    ),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("label", list(NEGATIVE))
def test_units_that_escape_are_not_hidden(label, method):
    build, chains, param, words, group = NEGATIVE[label]
    torch.manual_seed(0)
    model, x = build().double(), image()
    topo = detect_topology(model, x, allow_empty=True, method=method)
    assert [tuple(layer.name for layer in c.layers) for c in topo.chains] == chains
    found = {e.name: e for e in topo.excluded}
    assert words in found[param].reason, found[param].reason
    assert group in found[param].group, found[param].group
    if topo.chains:
        assert check_invariance(model, topo, x) <= 1e-12


def test_the_self_check_demotes_a_failing_hidden_layer_of_a_dag(monkeypatch):
    """A detector bug (sigmoid passed as homogeneous) claims c1 hidden; the self-check makes it an
    output layer again, and c1, left alone, goes to plain SGD with the reason."""
    real = det.transition
    monkeypatch.setattr(det, "transition", lambda op, lay, shape: lay if op.name == "Sigmoid" else real(op, lay, shape))
    torch.manual_seed(0)
    model, x = SmoothBranch(nn.Sigmoid()).double(), image()
    unchecked = detect_topology(model, x, self_check=False)
    assert [layer.name for layer in unchecked.chains[0].layers] == ["c1", "c2", "c3", "head"]
    topo = detect_topology(model, x)
    assert [[layer.name for layer in c.layers] for c in topo.chains] == [["c2", "c3", "head"]]
    assert topo.chains[0].sources[2] == (S(0, 0, 3), S(1, 0, 2))
    why = {e.name: e.reason for e in topo.excluded}["c1.weight"]
    assert why.startswith("'c1': the self-check found that rescaling the units between 'c1' and 'c2' changed")
    assert check_invariance(model, topo, x) <= 1e-12


def test_sequence_chains_stay_sequences():
    """A plain stack gives ``Chain(layers)`` with the default sources, as before DAG chains."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    chain = detect_topology(model, torch.randn(3, 4, dtype=torch.float64)).chains[0]
    assert chain.is_sequence and chain.sources == Chain(chain.layers).sources
    assert chain.hidden_layers == (0, 1) and chain.readers(0) == [(1, 0, range(6))]


def test_summary_shows_dag_chains():
    _, _, topo = _detect("inception")
    short, full = topo.summary(), topo.summary(verbose=True)
    assert "DAG chain 0: stem..fc  9 layers (8 hidden), hidden units 27" in short
    assert "    head: 5x11x1x1+bias (5 <- 11 nodes x 1 taps) hidden" in short
    assert "head: 5x11x1x1+bias (5 <- 11 nodes x 1 taps) hidden; reads 'b1', 'b2b', 'b3b', 'b4'" in full
    assert "b3b: 3x2x5x5+bias (3 <- 2 nodes x 25 taps) hidden; reads 'b3a'" in full
    _, _, shuffled = _detect("shuffle_view")
    assert "reads 'stem'[0:1], 'b'[0:1], 'stem'[1:2]" in shuffled.summary(verbose=True)
    assert "a: 4x4x1x1+bias (4 <- 4 nodes x 1 taps) hidden; reads 'stem'[4:8]" in shuffled.summary(verbose=True)


@pytest.mark.slow  # 117 layers: about 13 s on the loaded 2-core machine
def test_densenet_like_without_batchnorm_is_one_dag_chain():
    """Issue 14's DenseNet-121 acceptance, without torchvision: the DenseNet-121-like net of the refusal
    tests (blocks of 6, 12, 24, 16 layers joined by concatenation) with every BatchNorm an Identity."""
    from tests.test_refusal_messages import DenseNetLike

    torch.manual_seed(0)
    model = DenseNetLike()  # float32: float64 convolutions take 10x longer here
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.BatchNorm2d):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, nn.Identity())
    x = torch.randn(1, 3, 8, 8)
    topo = detect_topology(model, x)
    assert len(topo.chains) == 1 and not topo.chains[0].is_sequence
    assert topo.coverage == 1.0 and len(topo.chains[0].layers) == 2 + 2 * (6 + 12 + 24 + 16) + 3
    assert check_invariance(model, topo, x) <= 1e-5
