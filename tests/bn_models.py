"""Small BatchNorm ReLU networks with their segments written by hand (docs/math.md, "BatchNorm
segments: S1 and S2").

Each model is float64 and has a ``spec()`` that reads its own modules, so a deep copy gives its own
spec. A :class:`BnSpec` holds

* ``topology``: the chains. A chain may start at a BatchNorm affine: a :class:`ChainLayer` over
  ``bn.weight`` seen as ``[C, 1, 1]`` (one column from outside the chain, so ``gamma[j]`` is the
  sigma edge of unit ``j`` and ``beta`` its hidden bias); its channels are S1 units;
* ``s2``: every weight layer whose output rows go only into a training-mode BatchNorm (S2 rows), in a
  chain (always an output layer there) or alone (a layer reading from outside any chain).

The BatchNorms that add into a residual stream are one unit per channel (``ChainLayer.tied``, docs/math.md,
"Residual streams"); ``basic_skip`` leaves them to plain SGD, as everything the spec does not name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lightning_gsgd import Topology
from lightning_gsgd.topology.assemble import chain_layer
from lightning_gsgd.topology.types import Chain, ChainLayer, Excluded, Source

EPS = 1e-30  # BatchNorm eps: S2 is exact only as eps -> 0 (float64 makes 1e-30 negligible)


@dataclass(frozen=True)
class BnSpec:
    """A model's chains and S2 layers (see the module docstring)."""

    topology: Topology
    s2: tuple[ChainLayer, ...]


def bn_layer(name: str, bn: nn.BatchNorm2d) -> ChainLayer:
    """A BatchNorm affine as a chain layer: ``gamma`` as ``[C, 1, 1]``, ``beta`` as its bias."""
    return ChainLayer(name, bn.weight, bn.bias, bn.num_features, 1, 1, 0)


def _chain(layers: list[ChainLayer], sources: list[list[tuple[int, range]]]) -> Chain:
    return Chain(tuple(layers), tuple(tuple(Source(l, r) for l, r in srcs) for srcs in sources))


def _seq(layers: list[ChainLayer]) -> Chain:
    """A sequence chain whose first layer reads ``layers[0].n_in`` outside nodes."""
    src = [[(-1, range(layers[0].n_in))]] + [[(l, range(layers[l].n_out))] for l in range(len(layers) - 1)]
    return _chain(layers, src)


def _spec(model: nn.Module, chains: list[Chain], s2_names: list[str]) -> BnSpec:
    ids = {id(p) for c in chains for layer in c.layers for p in layer.params()}
    excluded = tuple(
        Excluded(n, p.numel(), "outside the hand-written chains")
        for n, p in model.named_parameters()
        if id(p) not in ids
    )
    in_chain = {id(layer.weight): layer for c in chains for layer in c.layers}
    s2 = []
    for n in s2_names:
        mod = model.get_submodule(n)
        s2.append(in_chain.get(id(mod.weight)) or chain_layer(n, mod, None, None))
    return BnSpec(Topology(tuple(chains), excluded), tuple(s2))


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=EPS)


class Stack(nn.Module):
    """conv-BN-ReLU stacks; ``deep``: the second segment is BN-ReLU-conv-ReLU-conv-BN (a hidden conv
    inside a segment, so hidden nodes end at S2 rows through their tau chains)."""

    def __init__(self, deep: bool) -> None:
        super().__init__()
        self.deep = deep
        self.c0, self.bn0 = nn.Conv2d(3, 5, 3, padding=1), _bn(5)
        self.c1 = nn.Conv2d(5, 4, 3, padding=1, bias=deep)
        self.bn1 = None if deep else _bn(4)
        self.c2, self.bn2 = nn.Conv2d(4, 6, 3, padding=1), _bn(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.bn0(self.c0(x)))
        h = F.relu(self.c1(h)) if self.deep else F.relu(self.bn1(self.c1(h)))
        h = F.relu(self.bn2(self.c2(h)))
        return self.fc(h.mean((2, 3)))

    def spec(self) -> BnSpec:
        c1, c2, fc = (chain_layer(n, getattr(self, n), None, None) for n in ("c1", "c2", "fc"))
        if self.deep:
            chains = [_seq([bn_layer("bn0", self.bn0), c1, c2]), _seq([bn_layer("bn2", self.bn2), fc])]
            return _spec(self, chains, ["c0", "c2"])
        chains = [_seq([bn_layer(f"bn{i}", getattr(self, f"bn{i}")), nxt]) for i, nxt in enumerate((c1, c2, fc))]
        return _spec(self, chains, ["c0", "c1", "c2"])


def tied_bn_layer(name: str, bn: nn.BatchNorm2d, writers: dict[str, nn.BatchNorm2d]) -> ChainLayer:
    """The first BatchNorm that writes a residual stream's channels, as a chain layer, with the
    ``gamma``/``beta`` of the others that add into the same channels (``writers``) tied to it."""
    tied = tuple(p for bn_k in writers.values() for p in (bn_k.weight, bn_k.bias))
    names = tuple(f"{n}.{w}" for n in writers for w in ("weight", "bias"))
    return ChainLayer(name, bn.weight, bn.bias, bn.num_features, 1, 1, 0, tied, names)


class Basic(nn.Module):
    """A stem, a BasicBlock with identity shortcut, one with a projection shortcut, a conv head.

    Its residual streams are units (docs/math.md, "Residual streams"): a channel of the stem's stream
    is written by ``bn_s`` and ``abn2`` (one unit, read by ``a1``, ``b1`` and ``proj``), a channel of
    the second block's by ``pbn`` and ``bbn2`` (read by ``head``)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn_s = nn.Conv2d(3, 4, 3, padding=1, bias=False), _bn(4)
        self.a1, self.abn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), _bn(4)
        self.a2, self.abn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), _bn(4)
        self.b1, self.bbn1 = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), _bn(6)
        self.b2, self.bbn2 = nn.Conv2d(6, 6, 3, padding=1, bias=False), _bn(6)
        self.proj, self.pbn = nn.Conv2d(4, 6, 1, stride=2, bias=False), _bn(6)
        self.head, self.hbn = nn.Conv2d(6, 5, 1), _bn(5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        h = F.relu(self.bn_s(self.stem(x)))
        h = F.relu(h + self.abn2(self.a2(F.relu(self.abn1(self.a1(h))))))
        h = F.relu(self.pbn(self.proj(h)) + self.bbn2(self.b2(F.relu(self.bbn1(self.b1(h))))))
        return self.fc(F.relu(self.hbn(self.head(h))).mean((2, 3)))

    def spec(self) -> BnSpec:
        s1 = tied_bn_layer("bn_s", self.bn_s, {"abn2": self.abn2})
        s2 = tied_bn_layer("pbn", self.pbn, {"bbn2": self.bbn2})
        a1, b1, proj, head = (chain_layer(n, getattr(self, n), None, None) for n in ("a1", "b1", "proj", "head"))
        chains = [
            _chain([s1, a1, proj, b1], [[(-1, range(1))], [(0, range(4))], [(0, range(4))], [(0, range(4))]]),
            _seq([bn_layer("abn1", self.abn1), chain_layer("a2", self.a2, None, None)]),
            _chain([s2, head], [[(-1, range(1))], [(0, range(6))]]),
            _seq([bn_layer("bbn1", self.bbn1), chain_layer("b2", self.b2, None, None)]),
            _seq([bn_layer("hbn", self.hbn), chain_layer("fc", self.fc, None, None)]),
        ]
        return _spec(self, chains, ["stem", "a1", "a2", "b1", "b2", "proj", "head"])


class BasicSkip(Basic):
    """:class:`Basic` with a coarser topology: the BatchNorm channels that feed an identity skip or a
    residual sum (``bn_s``, ``abn2``, ``pbn``, ``bbn2``) are no units and stay with plain SGD, and the
    layers that read the streams are S2 layers alone (what ``bn_mode="exact"`` found before residual
    streams)."""

    def spec(self) -> BnSpec:
        chains = [
            _seq([bn_layer("abn1", self.abn1), chain_layer("a2", self.a2, None, None)]),
            _seq([bn_layer("bbn1", self.bbn1), chain_layer("b2", self.b2, None, None)]),
            _seq([bn_layer("hbn", self.hbn), chain_layer("fc", self.fc, None, None)]),
        ]
        return _spec(self, chains, ["stem", "a1", "a2", "b1", "b2", "proj", "head"])


class VggBn(nn.Module):
    """conv-BN-ReLU, conv-BN-ReLU-maxpool, conv-BN-ReLU, flatten, Linear-ReLU-Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c0, self.bn0 = nn.Conv2d(3, 4, 3, padding=1, bias=False), _bn(4)
        self.c1, self.bn1 = nn.Conv2d(4, 5, 3, padding=1, bias=False), _bn(5)
        self.c2, self.bn2 = nn.Conv2d(5, 3, 3, padding=1), _bn(3)
        self.fc1, self.fc2 = nn.Linear(3 * 9, 7), nn.Linear(7, 3)

    def forward(self, x):
        h = F.relu(self.bn0(self.c0(x)))
        h = F.max_pool2d(F.relu(self.bn1(self.c1(h))), 2)
        h = F.relu(self.bn2(self.c2(h)))
        return self.fc2(F.relu(self.fc1(h.flatten(1))))

    def spec(self) -> BnSpec:
        c1, c2, fc2 = (chain_layer(n, getattr(self, n), None, None) for n in ("c1", "c2", "fc2"))
        fc1 = chain_layer("fc1", self.fc1, 3, 9)
        chains = [
            _seq([bn_layer("bn0", self.bn0), c1]),
            _seq([bn_layer("bn1", self.bn1), c2]),
            _seq([bn_layer("bn2", self.bn2), fc1, fc2]),
        ]
        return _spec(self, chains, ["c0", "c1", "c2"])


BN_MODELS: dict[str, Callable[[], nn.Module]] = {
    "stack": lambda: Stack(deep=False),
    "stack_deep": lambda: Stack(deep=True),
    "basic": Basic,
    "basic_skip": BasicSkip,
    "vgg_bn": VggBn,
}
BN_INPUTS = {"stack": (6, 6), "stack_deep": (6, 6), "basic": (6, 6), "basic_skip": (6, 6), "vgg_bn": (6, 6)}


def make_bn(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """``(model, x)``: model ``name`` in float64 and training mode, built under ``seed``, with random
    BatchNorm affines (so that gamma is no skeleton of ones)."""
    torch.manual_seed(seed)
    model = BN_MODELS[name]().double().train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.5)
    return model, torch.randn(4, 3, *BN_INPUTS[name], dtype=torch.float64)
