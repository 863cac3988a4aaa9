"""Prove a detected topology on the model, and keep what passes.

:func:`prove_topology` runs the self-check (:mod:`lightning_gsgd.topology.selfcheck`) on the chains
that detection found. A hidden layer whose rescaling (compensated in every layer that reads it)
changes the output becomes an output layer: a sequence chain is cut after it, a DAG chain splits
where nothing else holds it together; a layer left alone leaves the topology with the measured change
as its reason, and the rest is checked again until it passes. Then it records the hidden layers the check could not test
(:func:`~lightning_gsgd.topology.untested.untested_layers`).
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from lightning_gsgd.topology.assemble import demote
from lightning_gsgd.topology.bn import alone_layer
from lightning_gsgd.topology.selfcheck import interaction_failure, link_failure, self_check_errors
from lightning_gsgd.topology.types import Chain, ChainLayer, Excluded, Topology, TopologyError
from lightning_gsgd.topology.untested import untested_layers

log = logging.getLogger(__name__)


def _split(
    chains: list[Chain], links: list[tuple[int, int, float]], modules: dict[str, nn.Module], tol: float
) -> tuple[list[Chain], dict[str, str], list[ChainLayer]]:
    """Make every failing hidden layer an output layer (a sequence is cut after it); layers left
    without a hidden neighbour leave the topology, except those with S2 rows, which become S2 layers
    alone.

    Returns:
        The remaining chains, per layer name that left the reason, and the new S2 layers alone.
    """
    cuts: dict[int, dict[int, float]] = {}
    for ci, li, e in links:
        cuts.setdefault(ci, {})[li] = e
    out: list[Chain] = []
    gone: dict[str, str] = {}
    alone_s2: list[ChainLayer] = []
    for ci, chain in enumerate(chains):
        if ci not in cuts:
            out.append(chain)
            continue
        layers = chain.layers
        for li, e in sorted(cuts[ci].items()):
            readers = [layers[m].name for m, _, _ in chain.readers(li)]
            log.warning(
                "detect_topology: the self-check found that rescaling the units between '%s' and '%s' changes the "
                "output by %.2e (relative; tolerance %.0e); chain %s is split there",
                layers[li].name,
                "', '".join(dict.fromkeys(readers)),
                e,
                tol,
                chain.name,
            )
        kept, alone = demote(chain, set(cuts[ci]), modules)
        out += kept
        for l in alone:
            if l in chain.normalized:
                alone_s2.append(alone_layer(layers[l].name, modules[layers[l].name]))
                continue
            if l in cuts[ci]:  # the failing link after the layer, else one before it
                a, b, e = l, chain.readers(l)[0][0], cuts[ci][l]
            else:
                a = next(s.layer for s in chain.sources[l] if s.layer in cuts[ci])
                b, e = l, cuts[ci][a]
            name = layers[l].name
            gone[name] = (
                f"the self-check found that rescaling the units between '{layers[a].name}' and '{layers[b].name}' "
                f"changed the output by {e:.2e} (relative; tolerance {tol:.0e}); '{name}' is left in no chain"
            )
    return out, gone, alone_s2


def prove_topology(
    model: nn.Module, topo: Topology, example_input: Any, reference: Any, modules: dict[str, nn.Module]
) -> tuple[Topology, str | None]:
    """Self-check ``topo``; drop what fails and keep the rest; record the layers it cannot test.

    Returns:
        The proved topology, and the first failure's message (``None`` if nothing failed).

    Raises:
        TopologyError: The eval-mode output is not deterministic, or all units together break the
            invariance while no single chain does.
    """
    chains = list(topo.chains)
    normalized = list(topo.normalized)
    gone: dict[str, str] = {}  # layer name -> why it left
    first: str | None = None
    tol = 0.0
    for _ in range(2 + sum(len(c.layers) for c in chains)):  # every round removes a link or a chain
        current = Topology(tuple(chains), topo.excluded, topo.bn_layers, topo.method, normalized=tuple(normalized))
        err, tol, links, bad = self_check_errors(model, current, example_input, reference=reference)
        if err <= tol:
            break
        if not links and not bad:
            raise TopologyError(interaction_failure(err, tol))
        if first is None:
            first = (
                link_failure(current, *links[0], tol)
                if links
                else f"self-check failed in chain {bad[0][0]} ({chains[bad[0][0]].name}): rescaling its hidden units "
                f"changed the model output by {bad[0][1]:.2e} (relative; tolerance {tol:.0e}), though no single "
                "layer's do"
            )
        if links:
            chains, lost, more = _split(chains, links, modules, tol)
            gone.update(lost)
            normalized += more
        else:
            drop = dict(bad)
            for ci, e in drop.items():
                why = (
                    f"the self-check found that rescaling the hidden units of chain {chains[ci].name} changed the "
                    f"output by {e:.2e} (relative; tolerance {tol:.0e}), though no single layer's do"
                )
                log.warning("detect_topology: %s; the chain is left to plain SGD", why)
                gone.update({layer.name: why for layer in chains[ci].layers})
            chains = [c for ci, c in enumerate(chains) if ci not in drop]
    else:  # pragma: no cover - unreachable: each round shrinks the topology
        raise TopologyError("self-check: could not reduce the topology to one that passes")
    excluded = topo.excluded
    if gone:
        param_reason = {}
        for chain in topo.chains:
            for layer in chain.layers:
                if layer.name in gone:
                    for p in layer.params():
                        param_reason[id(p)] = f"'{layer.name}': {gone[layer.name]}"
        old = {e.name: e for e in topo.excluded}
        group = "the self-check found that rescaling its units changed the output"
        covered = {id(p) for c in chains for layer in c.layers for p in layer.params()}
        covered |= {id(layer.weight) for layer in topo.bn_layers}
        covered |= {id(p) for layer in normalized for p in (layer.weight, layer.bias) if p is not None}
        left = []
        for name, p in model.named_parameters():
            if id(p) in covered:
                continue
            if name in old:
                left.append(old[name])
            elif id(p) in param_reason:
                left.append(Excluded(name, p.numel(), param_reason[id(p)], group))
            else:
                left.append(Excluded(name, p.numel(), "not used on example_input"))
        excluded = tuple(left)
    proved = Topology(tuple(chains), excluded, topo.bn_layers, topo.method, normalized=tuple(normalized))
    silent = untested_layers(model, proved, example_input, tolerance=tol or None, reference=reference)
    if silent:
        proved.untested = tuple(proved.chains[ci].layers[li].name for ci, li in silent)
        names = ", ".join(f"'{n}'" for n in proved.untested[:3]) + (", ..." if len(proved.untested) > 3 else "")
        log.warning(
            "detect_topology: the self-check cannot test the hidden units of %d layer(s) (%s; all in "
            "Topology.untested): scaling them does not change the output on example_input (a zero gain or dead "
            "units?); they are claimed only because they are plain Linear/Conv layers joined by positively "
            "homogeneous ops",
            len(proved.untested),
            names,
        )
    return proved, first
