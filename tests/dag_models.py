"""Small DAG models (fan-out, concatenation, channel shuffle) with their chains written by hand.

Each builder returns ``(model, x, topology)`` in float64. The topology is written here from the
model's wiring, not detected, so that the step engine is tested apart from detection: layer order,
``Source`` runs and hidden layers are stated explicitly (tests/test_dag_models.py checks that the
function is invariant under the rescaling they claim).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lightning_gsgd import Topology
from lightning_gsgd.topology.assemble import chain_layer
from lightning_gsgd.topology.types import Chain, ChainLayer, Excluded, Source


def _layer(model: nn.Module, name: str, n_in: int | None = None, taps: int | None = None) -> ChainLayer:
    return chain_layer(name, model.get_submodule(name), n_in, taps)


def _topology(model: nn.Module, layers: list[ChainLayer], sources: list[list[tuple[int, range]]]) -> Topology:
    chain = Chain(tuple(layers), tuple(tuple(Source(l, r) for l, r in srcs) for srcs in sources))
    ids = {id(p) for layer in layers for p in (layer.weight, layer.bias) if p is not None}
    excluded = tuple(
        Excluded(n, p.numel(), "outside the hand-written chain")
        for n, p in model.named_parameters()
        if id(p) not in ids
    )
    return Topology((chain,), excluded)


class FanOut2(nn.Module):
    """One hidden layer read by two layers whose outputs are concatenated (unequal widths)."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.l1 = nn.Linear(5, 6, bias=bias)
        self.a = nn.Linear(6, 4, bias=bias)
        self.b = nn.Linear(6, 3, bias=bias)
        self.out = nn.Linear(7, 2, bias=bias)

    def forward(self, x):
        h = F.relu(self.l1(x))
        return self.out(torch.cat([F.relu(self.a(h)), F.relu(self.b(h))], 1))


def fanout2(bias: bool = True):
    m = FanOut2(bias).double()
    layers = [_layer(m, n) for n in ("l1", "a", "b", "out")]
    src = [[(-1, range(5))], [(0, range(6))], [(0, range(6))], [(1, range(4)), (2, range(3))]]
    return m, torch.randn(8, 5, dtype=torch.float64), _topology(m, layers, src)


class FanOut3(nn.Module):
    """One hidden layer read by three layers; two of them are outputs, added to a third branch's output."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(5, 6)
        self.a = nn.Linear(6, 2)
        self.b = nn.Linear(6, 4)
        self.c = nn.Linear(6, 2)
        self.d = nn.Linear(4, 2)

    def forward(self, x):
        h = F.relu(self.l1(x))
        return self.a(h) + self.d(F.relu(self.b(h))) + self.c(h)


def fanout3():
    m = FanOut3().double()
    layers = [_layer(m, n) for n in ("l1", "a", "b", "c", "d")]
    src = [[(-1, range(5))], [(0, range(6))], [(0, range(6))], [(0, range(6))], [(2, range(4))]]
    return m, torch.randn(8, 5, dtype=torch.float64), _topology(m, layers, src)


class Concat2(nn.Module):
    """Two producers of the input, concatenated into one conv, then a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(3, 5, 1)
        self.c3 = nn.Conv2d(9, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.cat([F.relu(self.c1(x)), F.relu(self.c2(x))], 1)
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.c3(h)), 1).flatten(1))


def concat2():
    m = Concat2().double()
    layers = [_layer(m, n) for n in ("c1", "c2", "c3")] + [_layer(m, "fc", 6, 1)]
    src = [[(-1, range(3))], [(-1, range(3))], [(0, range(4)), (1, range(5))], [(2, range(6))]]
    return m, torch.randn(4, 3, 6, 6, dtype=torch.float64), _topology(m, layers, src)


class Fire(nn.Module):
    """SqueezeNet's Fire module between a stem conv and a conv classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.squeeze = nn.Conv2d(6, 3, 1)
        self.e1 = nn.Conv2d(3, 4, 1)
        self.e3 = nn.Conv2d(3, 4, 3, padding=1)
        self.cls = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        s = F.relu(self.squeeze(F.max_pool2d(F.relu(self.stem(x)), 2)))
        h = torch.cat([F.relu(self.e1(s)), F.relu(self.e3(s))], 1)
        return F.adaptive_avg_pool2d(F.relu(self.cls(h)), 1).flatten(1)


def fire():
    m = Fire().double()
    layers = [_layer(m, n) for n in ("stem", "squeeze", "e1", "e3", "cls")]
    src = [[(-1, range(3))], [(0, range(6))], [(1, range(3))], [(1, range(3))], [(2, range(4)), (3, range(4))]]
    return m, torch.randn(4, 3, 8, 8, dtype=torch.float64), _topology(m, layers, src)


class Inception(nn.Module):
    """An Inception-style block: 1x1, 1x1 -> 3x3, and maxpool -> 1x1 branches, concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 6, 3, padding=1)
        self.b1 = nn.Conv2d(6, 3, 1)
        self.b2a = nn.Conv2d(6, 2, 1)
        self.b2b = nn.Conv2d(2, 3, 3, padding=1)
        self.b3 = nn.Conv2d(6, 2, 1)
        self.conv_out = nn.Conv2d(8, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.conv0(x))
        y = torch.cat([self.b1(h), self.b2b(F.relu(self.b2a(h))), self.b3(F.max_pool2d(h, 3, 1, 1))], 1)
        z = F.relu(self.conv_out(F.relu(y)))
        return self.fc(z.mean((2, 3)))


def inception():
    m = Inception().double()
    names = ("conv0", "b1", "b2a", "b2b", "b3", "conv_out")
    layers = [_layer(m, n) for n in names] + [_layer(m, "fc", 4, 1)]
    src = [
        [(-1, range(3))],
        [(0, range(6))],
        [(0, range(6))],
        [(2, range(2))],
        [(0, range(6))],
        [(1, range(3)), (3, range(3)), (4, range(2))],
        [(5, range(4))],
    ]
    return m, torch.randn(4, 3, 6, 6, dtype=torch.float64), _topology(m, layers, src)


class Dense(nn.Module):
    """A DenseNet-style block without BatchNorm: each layer reads the concatenation of all before it."""

    def __init__(self) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(3, 4, 3, padding=1)
        self.c1 = nn.Conv2d(4, 3, 3, padding=1)
        self.c2 = nn.Conv2d(7, 3, 3, padding=1)
        self.trans = nn.Conv2d(10, 5, 1)
        self.fc = nn.Linear(5 * 9, 3)

    def forward(self, x):
        x0 = self.c0(x)
        x1 = self.c1(F.relu(x0))
        x2 = self.c2(F.relu(torch.cat([x0, x1], 1)))
        t = self.trans(F.relu(torch.cat([x0, x1, x2], 1)))
        return self.fc(F.avg_pool2d(F.relu(t), 2).flatten(1))


def dense():
    m = Dense().double()
    layers = [_layer(m, n) for n in ("c0", "c1", "c2", "trans")] + [_layer(m, "fc", 5, 9)]
    src = [
        [(-1, range(3))],
        [(0, range(4))],
        [(0, range(4)), (1, range(3))],
        [(0, range(4)), (1, range(3)), (2, range(3))],
        [(3, range(5))],
    ]
    return m, torch.randn(4, 3, 6, 6, dtype=torch.float64), _topology(m, layers, src)


class Shuffle(nn.Module):
    """A ShuffleNet-V2-style unit: chunk, one branch, concatenate, channel shuffle (2 groups)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch = nn.Conv2d(4, 4, 1)
        self.conv = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x1, x2 = F.relu(self.stem(x)).chunk(2, dim=1)
        y = torch.cat([x1, F.relu(self.branch(x2))], 1)
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.fc(F.relu(self.conv(y)).mean((2, 3)))


def shuffle():
    m = Shuffle().double()
    layers = [_layer(m, n) for n in ("stem", "branch", "conv")] + [_layer(m, "fc", 6, 1)]
    # after the shuffle, channel k holds concatenated channel (k % 2) * 4 + k // 2
    conv_src = [(0, range(k // 2, k // 2 + 1)) if k % 2 == 0 else (1, range(k // 2, k // 2 + 1)) for k in range(8)]
    src = [[(-1, range(3))], [(0, range(4, 8))], conv_src, [(2, range(6))]]
    return m, torch.randn(4, 3, 6, 6, dtype=torch.float64), _topology(m, layers, src)


DAG_MODELS: dict[str, Callable] = {
    "fanout2": fanout2,
    "fanout2_nobias": lambda: fanout2(bias=False),
    "fanout3": fanout3,
    "concat2": concat2,
    "fire": fire,
    "inception": inception,
    "dense": dense,
    "shuffle": shuffle,
}


def make_dag(name: str, seed: int = 0):
    """``(model, x, topology)`` of DAG model ``name``, built under ``seed``."""
    torch.manual_seed(seed)
    return DAG_MODELS[name]()
