"""Find the ReLU chains of any PyTorch model: ``detect_topology``.

The model's data flow comes from :mod:`lightning_gsgd.topology.graph` (torch.fx tracing, or a recorded
forward pass when tracing fails). The units of every weight layer (``nn.Linear`` / ``nn.ConvNd`` with
``groups=1`` whose computation is provably the plain one,
:func:`~lightning_gsgd.topology.rules.computation_problem`, and whose parameters are used nowhere
else) are followed along every route, fan-out included (:mod:`lightning_gsgd.topology.dag`): they are
hidden when every op they meet is positively homogeneous per unit and keeps units whole
(:mod:`lightning_gsgd.topology.rules`, :mod:`lightning_gsgd.topology.units`: also concatenation,
chunk/slicing and channel shuffles) and every route ends at layers that read them. Chains are the
connected components of "reads a hidden unit of" (:mod:`lightning_gsgd.topology.assemble`); a
sequence comes out as ``Chain(layers)``. Everything else is left to plain SGD, with the reason. The
result is then proved on the model (:func:`lightning_gsgd.topology.prove.prove_topology`): hidden
layers that fail the self-check become output layers, and the layers it cannot test are recorded.
"""

from __future__ import annotations

import fnmatch
import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

from torch import nn

from lightning_gsgd.topology.assemble import assemble, chain_layer
from lightning_gsgd.topology.bn import (
    BN_MODES,
    alone_layer,
    bn_param_reasons,
    bn_unit_problem,
    groups_only,
    is_bn_module,
    normalizer,
)
from lightning_gsgd.topology.dag import propagate, s2_layers, verdicts
from lightning_gsgd.topology.exclusions import param_reasons
from lightning_gsgd.topology.graph import Op, OpGraph
from lightning_gsgd.topology.graph_fx import trace_fx
from lightning_gsgd.topology.graph_record import record_forward
from lightning_gsgd.topology.prove import prove_topology
from lightning_gsgd.topology.reasons import Why, group_of
from lightning_gsgd.topology.report import refusal
from lightning_gsgd.topology.rules import is_weight_layer, transition, weight_layer_problem
from lightning_gsgd.topology.selfcheck_s2 import prove_s2
from lightning_gsgd.topology.shard import refuse_sharded
from lightning_gsgd.topology.types import ChainLayer, Excluded, Topology, TopologyError

log = logging.getLogger(__name__)

_METHODS = ("auto", "fx", "record")


def build_graph(model: nn.Module, example_input: Any, method: str = "auto") -> OpGraph:
    """The model's op graph: torch.fx tracing, or recording a forward pass if tracing fails.

    Args:
        model: Any ``nn.Module`` (a ``LightningModule`` too); it runs in eval mode here.
        example_input: Tensor, tuple/list (positional arguments) or dict (keyword arguments).
        method: ``"auto"`` (fx, then recording), ``"fx"`` or ``"record"``.
    """
    if method not in _METHODS:
        raise ValueError(f"detect_topology: method must be one of {_METHODS}, got {method!r}")
    modes = [(m, m.training) for m in model.modules()]  # each submodule's own flag (a frozen BatchNorm too)
    model.eval()
    try:
        if method in ("auto", "fx"):
            try:
                return trace_fx(model, example_input)
            except Exception as exc:  # tracing fails on data-dependent control flow and more
                if method == "fx":
                    raise
                log.info(
                    "detect_topology: torch.fx tracing failed (%s: %s); recording a forward pass instead",
                    type(exc).__name__,
                    exc,
                )
        return record_forward(model, example_input)
    finally:
        for m, mode in modes:
            m.training = mode


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


class _Usage:
    """How often each module is called and each parameter is read, for the shared/frozen/pattern rules."""

    def __init__(self, graph: OpGraph, include: Sequence[str] | None, exclude: Sequence[str]) -> None:
        self.uses: Counter[int] = Counter()
        for op in graph:
            for p in {id(p): p for p in op.params}.values():
                self.uses[id(p)] += 1
        self.calls = Counter(id(op.module) for op in graph if op.kind == "module")
        self.include, self.exclude = include, exclude

    def problem(self, op: Op) -> Why | None:
        """Why a plain layer ``op`` (weight layer or BatchNorm) cannot be in a chain by its use."""
        mod = op.module
        assert mod is not None
        own = [p for p in (mod.weight, getattr(mod, "bias", None)) if p is not None]
        if self.calls[id(mod)] > 1:
            return Why(
                f"shared weight: module '{op.qualname}' is called {self.calls[id(mod)]} times",
                "shared weight: the module is called more than once",
            )
        if any(self.uses[id(p)] > 1 for p in own):
            return Why("shared weight: its parameters are also used by another op")
        if any(not p.requires_grad for p in own):
            return Why("frozen (requires_grad=False)")
        if self.include is not None and not _matches(op.qualname, self.include):
            return Why("not named in include=")
        if _matches(op.qualname, self.exclude):
            return Why("excluded by exclude=")
        return None


def _weight_problems(graph: OpGraph, usage: _Usage) -> dict[int, Why | None]:
    """For every weight-layer op: why it cannot be a chain layer (``None`` if it can)."""
    problems: dict[int, Why | None] = {}
    for op in graph:
        if not is_weight_layer(op):
            continue
        assert op.module is not None
        problem = weight_layer_problem(op.module)
        # read mod.weight only on a plain layer: a parametrization (spectral_norm) updates state on access
        problems[op.index] = problem if problem is not None else usage.problem(op)
    return problems


def _segment_ops(
    graph: OpGraph, usage: _Usage, problems: dict[int, Why | None]
) -> tuple[dict[int, Why | None], set[int]]:
    """``bn_mode="exact"``: per BatchNorm op, why its channels cannot be units (``None``: they may be);
    and the grouped convolutions that may have S2 rows (refused as chain layers only for ``groups``)."""
    bns: dict[int, Why | None] = {}
    for op in graph:
        if is_bn_module(op):
            bns[op.index] = bn_unit_problem(op) or usage.problem(op)
    grouped = {
        i
        for i, p in problems.items()
        if p is not None and groups_only(graph.ops[i].module) and usage.problem(graph.ops[i]) is None
    }
    return bns, grouped


def _make_layer(op: Op, n_in: int | None, taps: int | None) -> ChainLayer:
    assert op.module is not None
    return chain_layer(op.qualname, op.module, n_in, taps)


def find_chains(
    model: nn.Module,
    graph: OpGraph,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    bn_mode: str = "exact",
) -> Topology:
    """The chains and exclusions of ``model`` from its op graph (no self-check).

    Args:
        model: The model the graph was built from.
        graph: Its op graph (:func:`build_graph`).
        include: See :func:`detect_topology`.
        exclude: See :func:`detect_topology`.
        bn_mode: See :func:`detect_topology`.
    """
    if bn_mode not in BN_MODES:
        raise ValueError(f"detect_topology: bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
    ops = graph.ops
    exact = bn_mode == "exact"
    usage = _Usage(graph, include, exclude)
    problems = _weight_problems(graph, usage)
    bns, grouped = _segment_ops(graph, usage, problems) if exact else ({}, set())
    names = [op.qualname for op in ops if is_weight_layer(op) or op.index in bns]
    what = "Linear/Conv/BatchNorm" if bns else "Linear/Conv"
    for kind, patterns in (("include", include or ()), ("exclude", exclude)):
        for p in patterns:
            if not any(fnmatch.fnmatchcase(n, p) for n in names):
                shown = ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
                raise TopologyError(f"detect_topology: {kind}= pattern '{p}' matches no {what} layer ({shown})")
    # the module attribute, looked up now: tests stand in a faulty rule here to exercise the self-check
    flow = propagate(
        graph,
        problems,
        lambda op, layout, shape: transition(op, layout, shape),
        extra={i for i, p in bns.items() if p is None} | grouped,
        normalizer=normalizer(model) if exact else None,
    )
    hidden, ends, normalized = verdicts(graph, flow, exact, grouped)
    s2 = s2_layers(flow, [i for i, p in problems.items() if p is None] + sorted(grouped)) if exact else set()
    chains = assemble(graph, flow, hidden, s2)
    in_chain = {layer.name for c in chains for layer in c.layers}
    alone = [alone_layer(ops[i].qualname, ops[i].module) for i in sorted(s2) if ops[i].qualname not in in_chain]
    covered = {id(p) for layer in [*(layer for c in chains for layer in c.layers), *alone] for p in layer.params()}
    reasons = param_reasons(graph, problems, ends)
    reasons.update(bn_param_reasons(graph, bns, ends))
    bn_layers: list[ChainLayer] = []
    if bn_mode == "authors_heuristic":
        in_chain = {layer.name for c in chains for layer in c.layers}
        for i, norm in normalized.items():
            if ops[i].qualname in in_chain:
                continue
            layer = _make_layer(ops[i], None, None)
            bn_layers.append(layer)
            covered.add(id(layer.weight))
            if layer.bias is not None:
                reasons[id(layer.bias)] = Why(
                    f"bias of '{layer.name}', whose outputs {norm.describe()} normalizes "
                    "(the BN heuristic updates only the weight)",
                    "bias of a layer under the BatchNorm heuristic (it updates only the weight)",
                )
    unused = Why("not used on example_input")
    excluded = tuple(
        Excluded(name, p.numel(), str(why), group_of(why))
        for name, p in model.named_parameters()
        if id(p) not in covered
        for why in [reasons.get(id(p), unused)]
    )
    return Topology(tuple(chains), excluded, tuple(bn_layers), graph.method, normalized=tuple(alone))


_EMPTY_FIX = "allow_empty=True to accept a model without chains (every parameter then gets plain SGD)"


def _refuse_empty(model: nn.Module, topo: Topology) -> None:
    if not topo.excluded:
        raise TopologyError("detect_topology: no ReLU chain found (the model has no parameters)", topology=topo)
    head = f"detect_topology: no ReLU chain found in {type(model).__name__}."
    raise TopologyError(refusal(head, topo, [_EMPTY_FIX]), topology=topo)


def _check_coverage(topo: Topology, min_coverage: float) -> None:
    if topo.coverage < min_coverage:
        head = (
            f"detect_topology: coverage {100 * topo.coverage:.1f}% is below min_coverage="
            f"{100 * min_coverage:.1f}% (parameters left to plain SGD are listed below)."
        )
        raise TopologyError(refusal(head, topo, ["a lower min_coverage"]), topology=topo)


def detect_topology(
    model: nn.Module,
    example_input: Any,
    *,
    allow_empty: bool = False,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    min_coverage: float = 0.0,
    self_check: bool = True,
    bn_mode: str = "exact",
    method: str = "auto",
) -> Topology:
    """Find the ReLU chains of ``model`` that G-SGD treats exactly, and prove them.

    Args:
        model: Any ``nn.Module`` (a ``LightningModule`` too). Chain layers are ``nn.Linear`` and
            ``nn.ConvNd`` modules (``groups=1``) joined by ReLU/LeakyReLU/PReLU (modules,
            ``F.relu``, ``torch.relu``, ``Tensor.relu``, in place or not), pooling, dropout,
            channel-major flatten/view/reshape, spatial mean and identity.
        example_input: A batch the model accepts, as Lightning's ``example_input_array``: a
            tensor, a tuple/list of positional arguments, or a dict of keyword arguments (wrap a
            dict that ``forward`` takes as one argument in a tuple). The model runs on it in eval
            mode without gradients.
        allow_empty: Return a topology without chains instead of raising.
        include: Module-name patterns (``fnmatch``); if given, only matching layers may be in chains.
        exclude: Module-name patterns of layers to leave to plain SGD.
        min_coverage: Raise unless at least this share of the parameters is in chains.
        self_check: Rescale every detected hidden unit at random and check that the outputs on
            ``example_input`` do not change (:func:`lightning_gsgd.check_invariance`).
        bn_mode: What to do with BatchNorm and the layers whose outputs it normalizes per channel
            (directly or through ReLU/pooling/concatenation). ``"exact"`` (default): BatchNorm
            segments (docs/detection.md, "BatchNorm segments"): a BatchNorm affine whose channels
            reach only chain layers through homogeneous ops is a hidden chain layer (S1 units), and
            a layer whose every row goes only into training-mode BatchNorms has S2 rows
            (``Chain.normalized`` for a chain's output layer, ``Topology.normalized`` for a layer
            in no chain); ``include=``/``exclude=`` name BatchNorm modules too. The self-check
            also tests the S2 claims (in training mode, on a float64 copy). ``"sgd"``: leave
            layers followed by BatchNorm, and BatchNorm affines, to plain SGD and say so in
            ``excluded``. ``"authors_heuristic"``: list them in ``Topology.bn_layers`` so that
            :class:`~lightning_gsgd.GSGD` updates their weights with the heuristic of the G-SGD
            authors' CIFAR code (:mod:`lightning_gsgd.step.bn_heuristic`; not exact G-SGD, no invariance
            guarantee, not covered by the self-check).
        method: How to read the data flow: ``"auto"`` (torch.fx, falling back to recording a
            forward pass), ``"fx"`` or ``"record"``.

    Returns:
        The :class:`Topology`.

    Raises:
        TopologyError: No chain was found (unless ``allow_empty``), coverage is below
            ``min_coverage``, an include/exclude pattern matches no layer, or the self-check failed;
            or the model's parameters are already sharded DTensors (detect before ``fully_shard``,
            then :func:`lightning_gsgd.shard_topology`).
    """
    refuse_sharded(model)
    graph = build_graph(model, example_input, method)
    topo = find_chains(model, graph, include=include, exclude=exclude, bn_mode=bn_mode)
    if _empty(topo) and not allow_empty and min_coverage <= 0:
        _refuse_empty(model, topo)
    _check_coverage(topo, min_coverage)
    if self_check and topo.chains:
        modules = {op.qualname: op.module for op in graph if is_weight_layer(op) and op.module is not None}
        # the graph's forward pass ran the model's own modules in eval mode: reuse its output
        topo, failure = prove_topology(model, topo, example_input, graph.output, modules)
        if failure is not None:
            if _empty(topo) and not allow_empty:
                raise TopologyError(
                    f"{failure}\nNo chain passes the self-check, so the whole model would get plain SGD "
                    "(pass allow_empty=True to accept that).",
                    topology=topo,
                )
            _check_coverage(topo, min_coverage)
    if self_check and topo.s2_layers():
        topo = prove_s2(model, topo, example_input)
        if _empty(topo) and not allow_empty and min_coverage <= 0:
            _refuse_empty(model, topo)
        _check_coverage(topo, min_coverage)
    return topo


def _empty(topo: Topology) -> bool:
    return not topo.chains and not topo.bn_layers and not topo.normalized
