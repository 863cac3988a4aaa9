"""Chains from hidden layers: connected components of "reads a hidden node of", with their sources.

:func:`assemble` turns the verdicts of :mod:`lightning_gsgd.topology.dag` into
:class:`~lightning_gsgd.topology.types.Chain` objects: every hidden layer with every layer that reads
one of its nodes, grouped into connected components, in execution order. A sequence of layers each
reading all of the previous one's nodes is built as ``Chain(layers)``, exactly as before DAG chains.
:func:`demote` does the reverse for the self-check: a hidden layer that fails it becomes an output
layer, and the chain splits where nothing else holds it together.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from dataclasses import replace

from torch import nn

from lightning_gsgd.topology.bn import bn_chain_layer
from lightning_gsgd.topology.dag import Flow, decode
from lightning_gsgd.topology.graph import OpGraph
from lightning_gsgd.topology.rules import BATCHNORM, CONVS, conv_centre
from lightning_gsgd.topology.streams import tie_root, tied_members
from lightning_gsgd.topology.types import Chain, ChainLayer, Source


def chain_layer(name: str, mod: nn.Module, n_in: int | None, taps: int | None) -> ChainLayer:
    """The chain layer of module ``mod``; ``n_in``/``taps`` as it reads its hidden inputs (``None``: it reads
    none, so its input channels/features are its input nodes). A BatchNorm is its affine, ``[C, 1, 1]``."""
    if isinstance(mod, BATCHNORM):
        return bn_chain_layer(name, mod)
    if isinstance(mod, CONVS):
        k = tuple(mod.kernel_size)
        n = mod.in_channels if n_in is None else n_in
        t = math.prod(k) if taps is None else taps
        return ChainLayer(name, mod.weight, mod.bias, mod.out_channels, n, t, conv_centre(k))
    assert isinstance(mod, nn.Linear)
    n = mod.in_features if n_in is None else n_in
    t = 1 if taps is None else taps
    return ChainLayer(name, mod.weight, mod.bias, mod.out_features, n, t, t // 2)


def tie(layer: ChainLayer, writers: list[tuple[str, nn.Module | None]]) -> ChainLayer:
    """``layer`` (a BatchNorm affine) with the ``weight`` and ``bias`` of the BatchNorms that add into the
    same channels (``writers``: name and module) as its tied parameters (``ChainLayer.tied``)."""
    tied, names = [], []
    for name, mod in writers:
        assert isinstance(mod, BATCHNORM) and mod.weight is not None and mod.bias is not None
        tied += [mod.weight, mod.bias]
        names += [f"{name}.weight", f"{name}.bias"]
    return replace(layer, tied=tuple(tied), tied_names=tuple(names))


def runs(reads: Iterable[tuple[int, int]]) -> tuple[Source, ...]:
    """Sources from ``(chain layer or -1, node)`` per input node: maximal runs of one layer's nodes in
    arithmetic progression, and of nodes from outside."""
    found: list[list[int]] = []  # [layer, start, step, length]
    for layer, node in reads:
        if found:
            r = found[-1]
            if layer == -1 and r[0] == -1:
                r[3] += 1
                continue
            if layer >= 0 and r[0] == layer:
                if r[3] == 1 and node != r[1]:
                    r[2], r[3] = node - r[1], 2
                    continue
                if r[3] > 1 and node == r[1] + r[2] * r[3]:
                    r[3] += 1
                    continue
        found.append([layer, max(node, 0), 1, 1])
    return tuple(
        Source(-1, range(n)) if layer == -1 else Source(layer, range(s, s + st * n, st)) for layer, s, st, n in found
    )


def _make(layers: list[ChainLayer], sources: list[tuple[Source, ...]], normalized: tuple[int, ...] = ()) -> Chain:
    chain = Chain(tuple(layers), tuple(sources), normalized)
    return Chain(tuple(layers), normalized=normalized) if chain.is_sequence else chain


def _components(nodes: Iterable[int], edges: Iterable[tuple[int, int]]) -> list[list[int]]:
    parent = {n: n for n in nodes}

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    comps: dict[int, list[int]] = {}
    for n in sorted(parent):
        comps.setdefault(find(n), []).append(n)
    return sorted(comps.values(), key=min)


def assemble(graph: OpGraph, flow: Flow, hidden: set[int], s2: Collection[int] = ()) -> list[Chain]:
    """The chains: each hidden layer with the layers that read it, by connected component, in execution order;
    the output layers among ``s2`` (layers with S2 rows) are listed in ``Chain.normalized``."""
    ops = graph.ops
    members = tied_members(flow.ties)
    readers: dict[int, set[int]] = {}
    for b, read in flow.reads.items():
        prods = {tie_root(flow.ties, p) for p in read.units.producers()} & hidden
        if prods:
            readers[b] = prods
    edges = [(p, b) for b, prods in readers.items() for p in prods]
    chains = []
    for comp in _components(hidden | set(readers), edges):
        pos = {o: i for i, o in enumerate(comp)}
        layers, sources = [], []
        for o in comp:
            mod = ops[o].module
            assert mod is not None
            if o in readers:
                read = flow.reads[o]
                layers.append(chain_layer(ops[o].qualname, mod, read.n_in, read.taps))
                pairs = [(tie_root(flow.ties, p) if p >= 0 else p, node) for p, node in decode(read.units.ids.tolist())]
                sources.append(runs((pos[p], node) if p in hidden else (-1, -1) for p, node in pairs))
            else:
                layers.append(chain_layer(ops[o].qualname, mod, None, None))
                sources.append((Source(-1, range(layers[-1].n_in)),))
                if members.get(o):  # the BatchNorms of its residual stream: hidden biases of its units
                    layers[-1] = tie(layers[-1], [(ops[m].qualname, ops[m].module) for m in members[o]])
        chains.append(_make(layers, sources, tuple(pos[o] for o in comp if o in s2)))
    return chains


def demote(chain: Chain, drop: set[int], modules: dict[str, nn.Module]) -> tuple[list[Chain], list[int]]:
    """The chains left when the hidden layers ``drop`` (indices) become output layers: their readers
    read those nodes as from outside; a layer that then reads no hidden node reads its input
    channels/features as its nodes; output layers keep their S2 mark (``Chain.normalized``). Returns
    the chains and the indices of the layers left alone."""
    keep = {l for l in chain.hidden_layers if l not in drop}
    edges = [(s.layer, l) for l, srcs in enumerate(chain.sources) for s in srcs if s.layer in keep]
    out, alone = [], []
    for comp in _components(range(len(chain.layers)), edges):
        if len(comp) == 1:
            alone.append(comp[0])
            continue
        pos = {l: i for i, l in enumerate(comp)}
        layers, sources = [], []
        for l in comp:
            layer, srcs = chain.layers[l], chain.sources[l]
            if layer.tied and l not in keep:  # an output layer now: its stream's BatchNorms leave with it
                layer = replace(layer, tied=(), tied_names=())
            if not any(s.layer in keep for s in srcs):
                if any(s.layer >= 0 for s in srcs):  # it read only dropped layers: a first layer now
                    layer = chain_layer(layer.name, modules[layer.name], None, None)
                layers.append(layer)
                sources.append((Source(-1, range(layer.n_in)),))
                continue
            new: list[Source] = []
            for s in srcs:
                if s.layer in keep:
                    new.append(Source(pos[s.layer], s.nodes))
                elif new and new[-1].layer == -1:
                    new[-1] = Source(-1, range(len(new[-1].nodes) + len(s.nodes)))
                else:
                    new.append(Source(-1, range(len(s.nodes))))
            layers.append(layer)
            sources.append(tuple(new))
        out.append(_make(layers, sources, tuple(pos[l] for l in comp if l in chain.normalized)))
    return out, alone
