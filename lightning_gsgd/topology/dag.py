"""Which weight layers' units are hidden: every route from a layer's output, fan-out included.

:func:`propagate` labels the output nodes of every chain-eligible weight layer and carries the
labels forward through the op graph, in execution order: through the ops that keep units whole and
scale with them (:func:`lightning_gsgd.topology.units.step`), side by side through concatenations,
apart through ``chunk``/``split``/slicing, permuted through channel shuffles, to every consumer. A
label *ends* at a weight layer that reads it (a read, :class:`Read`) or at anything else that sees
it (a *spoil*: an add, a non-homogeneous op, a BatchNorm, an excluded layer, the model output...,
with the reason). :func:`verdicts` then decides per layer: its units are hidden when no label of it
was spoiled and every one of its nodes is read by some layer; otherwise the reason names the first
route that failed (docs/detection.md, "DAG chains").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lightning_gsgd.topology.graph import JOINS, METADATA, Op, OpGraph
from lightning_gsgd.topology.reasons import CONCAT, Why, combines, group_of
from lightning_gsgd.topology.rules import accepts, is_batchnorm, is_weight_layer, output_layout
from lightning_gsgd.topology.units import SHIFT, SPLITS, Transition, Units, fresh, join, split, step

_NODE = (1 << SHIFT) - 1


@dataclass
class Read:
    """What a weight layer reads: the units of its input, as ``n_in`` nodes of ``taps`` entries."""

    units: Units
    n_in: int
    taps: int


@dataclass
class Spoil:
    """Where a layer's units met an op that they may not pass, and why (``norm``: a per-channel BatchNorm)."""

    op: int
    reason: Why
    norm: bool = False


@dataclass
class Flow:
    """The outcome of :func:`propagate`.

    Attributes:
        labelled: Eligible weight layers (op index) whose units were followed, with their node count.
        unlocated: Eligible weight layers whose output units cannot be located.
        reads: Per weight layer that reads labelled units, what it reads.
        read_nodes: Per labelled layer, the nodes some weight layer reads.
        spoils: Per labelled layer, every op (in execution order) its units may not pass.
    """

    labelled: dict[int, int] = field(default_factory=dict)
    unlocated: set[int] = field(default_factory=set)
    reads: dict[int, Read] = field(default_factory=dict)
    read_nodes: dict[int, set[int]] = field(default_factory=dict)
    spoils: dict[int, list[Spoil]] = field(default_factory=dict)


def decode(ids: list[int]) -> list[tuple[int, int]]:
    """``(producer op, node)`` per label (``(-1, -1)`` for a node from outside)."""
    return [(v >> SHIFT, v & _NODE) if v >= 0 else (-1, -1) for v in ids]


class _Walk:
    def __init__(self, graph: OpGraph, problems: dict[int, Why | None], transition: Transition) -> None:
        self.ops = graph.ops
        self.problems = problems
        self.transition = transition
        self.units: dict[int, Units] = {}
        self.items: dict[int, list[Units | None]] = {}
        self.flow = Flow()

    def spoil(self, held: list[Units], at: int, why: Why, norm: bool = False) -> None:
        for p in sorted({p for u in held for p in u.producers()}):
            self.flow.spoils.setdefault(p, []).append(Spoil(at, why, norm))

    def held(self, src: int) -> list[Units]:
        if src in self.units:
            return [self.units[src]]
        return [u for u in self.items.get(src, []) if u is not None]

    def visit(self, op: Op, mine: list[int]) -> None:
        held = [u for s in mine for u in self.held(s)]
        if op.kind == "output":
            self.spoil(held, op.index, Why("model output", "the model's output layer"))
            return
        if op.name in JOINS and op.pieces is not None:
            pieces = []
            for p, k, shape in op.pieces:
                u = self.units.get(p) if k is None else (self.items[p][k] if p in self.items else None)
                pieces.append((u, shape))
            res = join(op, pieces)
            if isinstance(res, Units):
                self.units[op.index] = res
            else:
                self.spoil(held, op.index, res)
            return
        src = mine[0]
        others = [s for s in op.inputs if s != src and s >= 0 and self.ops[s].shape is not None]
        if len(mine) > 1 or others or op.data_input != src or op.name in CONCAT:
            self.spoil(held, op.index, combines(op))
            return
        if src in self.items:  # an element of chunk/split
            k = op.args[1] if op.name == "getitem" and len(op.args) > 1 else None
            pieces = self.items[src]
            if isinstance(k, int) and -len(pieces) <= k < len(pieces):
                if pieces[k] is not None:
                    self.units[op.index] = pieces[k]  # type: ignore[assignment]
            else:
                self.spoil(held, op.index, combines(op))
            return
        self.single(op, self.units[src], self.ops[src].shape)

    def single(self, op: Op, u: Units, in_shape: tuple[int, ...] | None) -> None:
        if in_shape is None:
            self.spoil([u], op.index, combines(op))
            return
        if is_weight_layer(op):
            problem = self.problems.get(op.index)
            if problem:
                why = Why(f"next layer '{op.qualname}' is excluded ({problem})", "the next layer is excluded")
                self.spoil([u], op.index, why)
                return
            how: tuple[int, int] | Why = (
                accepts(op, u.layout(), in_shape)
                if u.flat
                else Why(
                    f"'{op.qualname}' does not read the units as channels", "the next layer does not read its units"
                )
            )
            if isinstance(how, Why):
                self.spoil([u], op.index, how)
                return
            self.flow.reads[op.index] = Read(u, *how)
            for p, node in decode(u.ids.tolist()):
                if p >= 0:
                    self.flow.read_nodes.setdefault(p, set()).add(node)
            return
        if op.name in SPLITS and op.items is not None:
            parts = split(op, u, in_shape)
            if isinstance(parts, Why):
                self.spoil([u], op.index, parts)
            else:
                self.items[op.index] = parts
            return
        res = step(op, u, in_shape, self.transition)
        if isinstance(res, Units):
            self.units[op.index] = res
            return
        per_channel = u.flat and u.dim == 1 and u.inner == 1 and len(in_shape) >= 2
        self.spoil([u], op.index, res, is_batchnorm(op) and per_channel)


def propagate(graph: OpGraph, problems: dict[int, Why | None], transition: Transition) -> Flow:
    """Follow the units of every chain-eligible weight layer (``problems[op] is None``) forward.

    Args:
        graph: The model's op graph.
        problems: Per weight-layer op, why it cannot be a chain layer (``None``: it can).
        transition: The per-op rule for ops that keep one tensor's units on one dim
            (:func:`lightning_gsgd.topology.rules.transition`).
    """
    walk = _Walk(graph, problems, transition)
    for op in graph.ops:
        mine = [s for s in dict.fromkeys(op.inputs) if s >= 0 and (s in walk.units or s in walk.items)]
        if mine and not (op.kind == "call" and op.name in METADATA):  # x.size(0) reads no values
            walk.visit(op, mine)
        if is_weight_layer(op) and problems.get(op.index) is None:
            in_shape = graph.ops[op.data_input].shape if op.data_input >= 0 else None
            layout = output_layout(op, in_shape)
            if layout is None:
                walk.flow.unlocated.add(op.index)
            else:
                walk.units[op.index] = fresh(op.index, layout)
                walk.flow.labelled[op.index] = layout.units
    return walk.flow


def _unread(n: int, read: set[int]) -> Why:
    if not read:
        return Why(
            "none of its units reaches a layer that reads them (they are sliced away or not used)",
            "its units reach no layer",
        )
    return Why(
        f"{n - len(read)} of its {n} units are read by no layer (sliced away or not used); all units of a layer are "
        "hidden or none (conservative)",
        "some of its units are read by no layer",
    )


def _why(graph: OpGraph, a: int, flow: Flow) -> tuple[Why, Op | None]:
    """Why layer ``a``'s units are not hidden, walking its route up to the first fork: the reason,
    and the BatchNorm that normalizes them per channel when a single route ends there."""
    ops = graph.ops
    spoils = flow.spoils.get(a, [])
    read = flow.read_nodes.get(a, set())
    n = flow.labelled[a]
    at: dict[int, Spoil] = {}
    for s in spoils:
        at.setdefault(s.op, s)
    cur = ops[a]
    while True:
        what = "its output" if cur.index == a else f"the output of {cur.describe()}"
        if not cur.users:
            return (_unread(n, read) if read else Why(f"{what} is not used", "its output is not used")), None
        if len(cur.users) > 1:
            r = spoils[0].reason if spoils else _unread(n, read)
            return Why(
                f"{what} has {len(cur.users)} consumers; on one route: {r}",
                f"several consumers, one route: {group_of(r)}",
            ), None
        u = ops[cur.users[0]]
        if u.index in at:
            s = at[u.index]
            return s.reason, (u if s.norm else None)
        if is_weight_layer(u) or u.kind == "output":
            return (spoils[0].reason if spoils else _unread(n, read)), None
        cur = u


def verdicts(graph: OpGraph, flow: Flow) -> tuple[set[int], dict[int, Why], dict[int, Op]]:
    """Per eligible layer: hidden or not, and why not.

    Returns:
        ``(hidden, ends, normalized)``: the op indices of the layers whose units are hidden; for every
        other eligible layer, why (the reason of its first failing route; after a fork, prefixed with
        the fork); and the layers whose single route ends at a BatchNorm that normalizes them per
        channel, with that BatchNorm (for ``bn_mode="authors_heuristic"``).
    """
    hidden: set[int] = set()
    ends: dict[int, Why] = {}
    normalized: dict[int, Op] = {}
    for a, n in flow.labelled.items():
        if not flow.spoils.get(a) and len(flow.read_nodes.get(a, ())) == n:
            hidden.add(a)
            continue
        why, norm = _why(graph, a, flow)
        ends[a] = why
        if norm is not None:
            normalized[a] = norm
    for a in flow.unlocated:
        ends[a] = Why("its output units cannot be located (unbatched input?)")
    return hidden, ends, normalized
