"""The exact BatchNorm topology of a hand-written :class:`tests.bn_models.BnSpec`, for the engine's tests.

A spec names its S2 layers by hand; the engine reads them as ``Chain.normalized`` (S2 output layers
of a chain) and ``Topology.normalized`` (S2 layers alone). Built here from the spec only, so the
engine's tests do not depend on detection.
"""

from __future__ import annotations

from dataclasses import replace

from lightning_gsgd import Topology
from tests.bn_models import BnSpec


def exact_topology(spec: BnSpec) -> Topology:
    """``spec.topology`` with its S2 layers marked: in chains by index, the others as layers alone
    (their weights and biases leave ``excluded``)."""
    s2 = {id(layer.weight) for layer in spec.s2}
    chains = tuple(
        replace(c, normalized=tuple(l for l, layer in enumerate(c.layers) if id(layer.weight) in s2))
        for c in spec.topology.chains
    )
    in_chain = {id(layer.weight) for c in chains for layer in c.layers}
    alone = tuple(layer for layer in spec.s2 if id(layer.weight) not in in_chain)
    names = {layer.name + suffix for layer in alone for suffix in (".weight", ".bias")}
    excluded = tuple(e for e in spec.topology.excluded if e.name not in names)
    return Topology(chains, excluded, normalized=alone)
