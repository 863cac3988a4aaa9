"""Short reports of what detection left out: counts, reasons grouped with examples, and the fix.

Errors and warnings stay short whatever the model's size: what was found, each reason *group* (the
cause without module names, :class:`~lightning_gsgd.topology.reasons.Why`) once with its count and
at most three example parameters, and the fix. The full list stays on the
:class:`~lightning_gsgd.topology.types.Topology` (``excluded``, ``summary(verbose=True)``), which an
error carries as ``TopologyError.topology``. This module reads ``Excluded``-like objects (``name``,
``numel``, ``reason``, ``group``) and imports nothing from the package.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

EXAMPLES = 3
NAME_CHARS = 40  # longer example names keep their end
GROUP_CHARS = 110
BUDGET = 1000  # characters of a whole refusal, as issue 14 asks
FULL_LIST = "every parameter with its reason: the error's .topology.summary(verbose=True)"
BN_FIX = (
    'bn_mode="exact" (the default: BatchNorm channels as units and rows normalized by BatchNorm, exact G-SGD) '
    'or bn_mode="authors_heuristic" (layers before BatchNorm get the G-SGD authors\' heuristic, not exact G-SGD)'
)
_ACTIVATION = re.compile(r"(?:^|: )(\w+) is not positively homogeneous")


@dataclass
class Group:
    """Excluded parameters that share one cause."""

    text: str
    tensors: int = 0
    values: int = 0
    examples: list[str] = field(default_factory=list)
    modules: set[str] = field(default_factory=set)


def count(n: int) -> str:
    """``1234567`` -> ``"1.2M"``, ``12345`` -> ``"12.3k"``."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short_name(name: str) -> str:
    """A long parameter name keeps its last dotted parts: ``'...denselayer1.conv1.weight'``."""
    if len(name) <= NAME_CHARS:
        return name
    tail = name[-(NAME_CHARS - 3) :]
    return "..." + (tail.split(".", 1)[1] if "." in tail[1:] else tail)


def groups(excluded: Iterable[Any]) -> list[Group]:
    """The excluded parameters by reason group, the largest share of values first; examples are
    parameter names of distinct modules, in model order."""
    found: dict[str, Group] = {}
    for e in excluded:
        text = getattr(e, "group", "") or e.reason
        g = found.setdefault(text, Group(text))
        g.tensors += 1
        g.values += e.numel
        module = e.name.rpartition(".")[0]
        if module not in g.modules and len(g.examples) < EXAMPLES:
            g.examples.append(e.name)
        g.modules.add(module)
    return sorted(found.values(), key=lambda g: (-g.values, -g.tensors))


def _line(g: Group, examples: int) -> str:
    names = ", ".join(f"'{_short_name(n)}'" for n in g.examples[:examples])
    more = ", ..." if len(g.modules) > examples else ""
    return f"  - {_short(g.text, GROUP_CHARS)} [{g.tensors} tensors, {count(g.values)} values]: {names}{more}"


def group_lines(excluded: Sequence[Any], budget: int) -> list[str]:
    """One line per reason group (count, values, up to three examples: fewer where the room runs
    short) while they fit in ``budget`` characters, then one line for the rest."""
    all_groups = groups(excluded)
    lines: list[str] = []
    left = budget
    for i, g in enumerate(all_groups):
        reserve = 50 if i + 1 < len(all_groups) else 0  # for the "N more reason(s)" line
        fits = [line for k in range(len(g.examples), 0, -1) if len(line := _line(g, k)) + 1 + reserve <= left]
        if not fits and lines:
            rest = all_groups[i:]
            tensors, values = sum(r.tensors for r in rest), sum(r.values for r in rest)
            lines.append(f"  - {len(rest)} more reason(s) [{tensors} tensors, {count(values)} values]")
            break
        line = fits[0] if fits else _line(g, 1)
        lines.append(line)
        left -= len(line) + 1
    return lines


def found_line(topo: Any) -> str:
    """What detection found: chains, layers, coverage, and how much is left to plain SGD."""
    excluded = topo.excluded
    layers = sum(len(c.layers) for c in topo.chains)
    bn = f", {len(topo.bn_layers)} layer(s) under the BatchNorm heuristic" if topo.bn_layers else ""
    return (
        f"Found {len(topo.chains)} ReLU chain(s) ({layers} layers){bn}, coverage {100 * topo.coverage:.1f}% of "
        f"{count(topo.total_params)} values; {len(excluded)} parameter tensors "
        f"({count(sum(e.numel for e in excluded))} values) are left to plain SGD, by reason:"
    )


def fixes(topo: Any) -> list[str]:
    """The changes to the model or the arguments that would put more of it in chains."""
    texts = [g.text for g in groups(topo.excluded)]
    out = []
    if any("see bn_mode" in t for t in texts):
        out.append(BN_FIX)
    acts = list(dict.fromkeys(m.group(1) for t in texts if (m := _ACTIVATION.search(t))))
    if acts:
        out.append(f"ReLU-family activations (ReLU, LeakyReLU, PReLU) instead of {', '.join(acts[:4])}")
    return out


def refusal(headline: str, topo: Any, fix: Sequence[str], budget: int = BUDGET) -> str:
    """``headline``, what was found, the grouped reasons, where the full list is, and the fix last."""
    tail = [f"({FULL_LIST})", "Fix: " + "; or ".join(list(fixes(topo)) + list(fix)) + "."]
    head = [headline, found_line(topo)]
    room = budget - sum(len(t) + 1 for t in head + tail)
    return "\n".join(head + group_lines(topo.excluded, max(room, 200)) + tail)


_SHORT_LAYERS = 12  # layers of a DAG chain that summary() lists by default
_SHORT_SOURCES = 6  # source runs per layer that summary(verbose=True) lists


def _layer_line(layer: Any) -> str:
    kind = "x".join(str(s) for s in layer.weight.shape)
    bias = "+bias" if layer.bias is not None else ""
    return f"    {layer.name}: {kind}{bias} ({layer.n_out} <- {layer.n_in} nodes x {layer.taps} taps)"


def _source_text(chain: Any, src: Any) -> str:
    r = src.nodes
    if src.layer < 0:
        return f"outside x{len(r)}"
    prod = chain.layers[src.layer]
    if r == range(prod.n_out):
        return f"'{prod.name}'"
    step = "" if r.step == 1 else f":{r.step}"
    return f"'{prod.name}'[{r.start}:{r.stop}{step}]"


def _s2(chain: Any, l: int) -> str:
    """The marks of a chain layer whose rows BatchNorm normalizes, or whose units are a residual
    stream's channels (the other BatchNorms that add into them)."""
    mark = ", rows normalized by BatchNorm (S2)" if l in chain.normalized else ""
    writers = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in chain.layers[l].tied_names))
    if writers:
        shown = ", ".join(writers[:3]) + (f", ... ({len(writers)} in all)" if len(writers) > 3 else "")
        mark += f", residual stream with {shown}"
    return mark


def chain_lines(chain: Any, i: int, verbose: bool) -> list[str]:
    """A chain's lines in ``Topology.summary``: a sequence as its widths and layers; a DAG chain as
    its layer and hidden-unit counts, each layer marked hidden or output, and (``verbose``) what each
    layer reads, run by run."""
    if chain.is_sequence:
        widths = "-".join(str(w) for w in chain.widths)
        head = (
            f"  chain {i}: {chain.name}  widths {widths}  hidden units {chain.hidden_units}  "
            f"basis paths {chain.basis_paths}"
        )
        return [head] + [_layer_line(layer) + _s2(chain, l) for l, layer in enumerate(chain.layers)]
    lines = [
        f"  DAG chain {i}: {chain.name}  {len(chain.layers)} layers ({len(chain.hidden_layers)} hidden), "
        f"hidden units {chain.hidden_units}  basis paths {chain.basis_paths}"
    ]
    shown = chain.layers if verbose else chain.layers[:_SHORT_LAYERS]
    for l, layer in enumerate(shown):
        line = _layer_line(layer) + (" hidden" if chain.hidden[l] else " output") + _s2(chain, l)
        if verbose:
            srcs = chain.sources[l]
            texts = [_source_text(chain, s) for s in srcs[:_SHORT_SOURCES]]
            more = f", ... ({len(srcs)} runs)" if len(srcs) > _SHORT_SOURCES else ""
            line += f"; reads {', '.join(texts)}{more}"
        lines.append(line)
    if len(shown) < len(chain.layers):
        lines.append(f"    ... {len(chain.layers) - len(shown)} more layer(s) (summary(verbose=True) lists them)")
    return lines


_SHORT_CHAINS = 8  # chains (and BN-heuristic layers) that summary() lists by default
_SHORT_EXCLUDED = 12  # excluded parameters that summary() lists one per line by default


def summary_text(topo: Any, verbose: bool) -> str:
    """``Topology.summary``: the topology as readable lines (see that method)."""
    via = f" [data flow from {topo.method}]" if topo.method else ""
    lines = [
        f"G-SGD topology: {len(topo.chains)} chain(s), {topo.hidden_units} hidden units, "
        f"{topo.basis_paths} basis paths, coverage {100 * topo.coverage:.1f}% "
        f"({topo.covered_params} of {topo.total_params} parameters){via}"
    ]
    if topo.s1_units or topo.s2_rows:
        alone = sum(layer.n_out for layer in topo.normalized)
        lines.append(
            f"  BatchNorm segments: {topo.s1_units} BatchNorm channels as units (S1), {topo.s2_rows} rows "
            f"normalized by BatchNorm (S2; {alone} of them in {len(topo.normalized)} layer(s) outside chains)"
        )
        streams = [layer for c in topo.chains for layer in c.layers if layer.tied]
        if streams:
            tied_bns = sum(len(layer.tied) // 2 for layer in streams)
            channels, bns = sum(layer.n_out for layer in streams), len(streams) + tied_bns
            lines.append(
                f"  residual streams: {channels} of those channels are written by {bns} BatchNorms together "
                f'({len(streams)} stream(s); docs/math.md, "Residual streams")'
            )
        shown_alone = topo.normalized if verbose else topo.normalized[:_SHORT_CHAINS]
        if shown_alone:
            names = ", ".join(layer.name for layer in shown_alone)
            rest = len(topo.normalized) - len(shown_alone)
            lines.append(f"  S2 layers outside chains: {names}" + (f", ... ({rest} more)" if rest else ""))
    more = " (summary(verbose=True) lists them)"
    shown = topo.chains if verbose else topo.chains[:_SHORT_CHAINS]
    for i, chain in enumerate(shown):
        lines += chain_lines(chain, i, verbose)
    if len(shown) < len(topo.chains):
        lines.append(f"  ... {len(topo.chains) - len(shown)} more chain(s){more}")
    if topo.untested:
        names = topo.untested if verbose or len(topo.untested) <= 3 else topo.untested[:3] + ("...",)
        lines.append(
            f"  not tested by the self-check ({len(topo.untested)} layer(s): their units did not affect the "
            f"output on example_input; claimed as plain Linear/Conv layers): {', '.join(names)}"
        )
    if topo.bn_layers:
        share = 100 * topo.bn_heuristic_params / topo.total_params if topo.total_params else 0.0
        lines.append(
            f"  BatchNorm heuristic of the G-SGD authors (not exact G-SGD): "
            f"{len(topo.bn_layers)} layer(s), {topo.bn_heuristic_params} parameters ({share:.1f}%)"
        )
        bn_shown = topo.bn_layers if verbose else topo.bn_layers[:_SHORT_CHAINS]
        for layer in bn_shown:
            kind = "x".join(str(s) for s in layer.weight.shape)
            lines.append(f"    {layer.name}: {kind} ({layer.n_out} <- {layer.n_in} channels x {layer.taps} taps)")
        if len(bn_shown) < len(topo.bn_layers):
            lines.append(f"    ... {len(topo.bn_layers) - len(bn_shown)} more{more}")
    if topo.excluded and (verbose or len(topo.excluded) <= _SHORT_EXCLUDED):
        lines.append("  left to plain SGD:")
        for e in topo.excluded:
            lines.append(f"    {e.name} ({e.numel} params): {e.reason}")
    elif topo.excluded:
        values = sum(e.numel for e in topo.excluded)
        lines.append(f"  left to plain SGD: {len(topo.excluded)} parameter tensors ({values} values), by reason{more}:")
        lines += ["  " + line for line in group_lines(topo.excluded, 1200)]
    return "\n".join(lines)
