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

With ``bn_mode="exact"`` (:mod:`lightning_gsgd.topology.bn`) BatchNorm affines are labelled too (their
channels may be hidden units, S1), grouped convolutions are labelled for S2 only, and a label that
ends at the input of a training-mode BatchNorm, per channel, is recorded as normalized
(``Flow.norm_nodes``): a layer all of whose nodes end there, and nowhere else, has S2 rows
(:func:`s2_layers`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from lightning_gsgd.topology.graph import JOINS, METADATA, Op, OpGraph
from lightning_gsgd.topology.reasons import CONCAT, Why, combines, group_of
from lightning_gsgd.topology.rules import BATCHNORM, Layout, accepts, is_batchnorm, is_weight_layer, output_layout
from lightning_gsgd.topology.streams import tie_sum, tied_members
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
        norm_nodes: Per labelled layer, its nodes that reach a training-mode BatchNorm per channel
            (exact mode only).
        ties: Per BatchNorm whose channels were added elementwise to another BatchNorm's (a residual
            stream, exact mode only), a BatchNorm of the same stream (:mod:`lightning_gsgd.topology.streams`).
    """

    labelled: dict[int, int] = field(default_factory=dict)
    unlocated: set[int] = field(default_factory=set)
    reads: dict[int, Read] = field(default_factory=dict)
    read_nodes: dict[int, set[int]] = field(default_factory=dict)
    spoils: dict[int, list[Spoil]] = field(default_factory=dict)
    norm_nodes: dict[int, set[int]] = field(default_factory=dict)
    ties: dict[int, int] = field(default_factory=dict)


def decode(ids: list[int]) -> list[tuple[int, int]]:
    """``(producer op, node)`` per label (``(-1, -1)`` for a node from outside)."""
    return [(v >> SHIFT, v & _NODE) if v >= 0 else (-1, -1) for v in ids]


Normalizer = Callable[[Op], "Why | None"]


class _Walk:
    def __init__(
        self,
        graph: OpGraph,
        problems: dict[int, Why | None],
        transition: Transition,
        normalizer: Normalizer | None = None,
    ) -> None:
        self.ops = graph.ops
        self.problems = problems
        self.transition = transition
        self.normalizer = normalizer
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
        if self.normalizer is not None:  # exact mode: a sum of two BatchNorms' channels (a residual stream)
            tied = tie_sum(op, self.units, self.ops, self.flow.ties)
            if tied is not None:
                self.units[op.index] = tied
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
        if self.normalizer is None or not is_batchnorm(op):
            self.spoil([u], op.index, res, is_batchnorm(op) and per_channel)
            return
        not_s2 = (
            self.normalizer(op)
            if per_channel
            else Why(
                f"{op.describe()} does not normalize its units per channel here", f"{op.name} does not act per channel"
            )
        )
        if not_s2 is not None:
            self.spoil([u], op.index, not_s2)
            return
        self.spoil([u], op.index, Why(f"{op.describe()} normalizes it (S2)", f"{op.name} normalizes it (S2)"), True)
        for p, node in decode(u.ids.tolist()):
            if p >= 0:
                self.flow.norm_nodes.setdefault(p, set()).add(node)


def _own_layout(op: Op, graph: OpGraph) -> Layout | None:
    """Where the output units of a labelled op are: a weight layer's, or a BatchNorm's channels (dim 1)."""
    if isinstance(op.module, BATCHNORM):
        ok = op.shape is not None and len(op.shape) >= 2 and op.shape[1] == op.module.num_features
        return Layout(1, op.module.num_features) if ok else None
    in_shape = graph.ops[op.data_input].shape if op.data_input >= 0 else None
    return output_layout(op, in_shape)


def propagate(
    graph: OpGraph,
    problems: dict[int, Why | None],
    transition: Transition,
    extra: Collection[int] = (),
    normalizer: Normalizer | None = None,
) -> Flow:
    """Follow the units of every chain-eligible weight layer (``problems[op] is None``) forward.

    Args:
        graph: The model's op graph.
        problems: Per weight-layer op, why it cannot be a chain layer (``None``: it can).
        transition: The per-op rule for ops that keep one tensor's units on one dim
            (:func:`lightning_gsgd.topology.rules.transition`).
        extra: Further ops whose output units are labelled (``bn_mode="exact"``: BatchNorm affines,
            and grouped convolutions, which may have S2 rows but are never read as chain layers).
        normalizer: ``bn_mode="exact"``: for a BatchNorm op, ``None`` when it normalizes the units
            that reach it in training mode (they end there as normalized, ``Flow.norm_nodes``), else why
            not. ``None`` (the other modes): every BatchNorm ends the units with ``Spoil.norm`` set.
    """
    walk = _Walk(graph, problems, transition, normalizer)
    for op in graph.ops:
        mine = [s for s in dict.fromkeys(op.inputs) if s >= 0 and (s in walk.units or s in walk.items)]
        if mine and not (op.kind == "call" and op.name in METADATA):  # x.size(0) reads no values
            walk.visit(op, mine)
        if (is_weight_layer(op) and problems.get(op.index) is None) or op.index in extra:
            layout = _own_layout(op, graph)
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


def _mixed(n: int, read: set[int], normed: set[int]) -> Why:
    """Why units that end only at layers and at training-mode BatchNorms are neither hidden nor S2."""
    if read and normed:
        return Why(
            f"{len(normed)} of its {n} units go into a BatchNorm and {len(read)} to a layer that reads them: "
            "neither hidden units (every route must end at a layer) nor S2 rows (every route at a BatchNorm)",
            "its units go both into a BatchNorm and to a layer",
        )
    if normed and len(normed) == n:
        return Why(
            "its units go only into BatchNorms, which normalize them (no layer reads them as units)",
            "its units go only into BatchNorms",
        )
    return _unread(n, read | normed)


def _why(graph: OpGraph, a: int, flow: Flow, exact: bool = False) -> tuple[Why, Op | None]:
    """Why layer ``a``'s units are not hidden, walking its route up to the first fork: the reason,
    and the BatchNorm that normalizes them per channel when a single route ends there (``exact``:
    routes that end at a training-mode BatchNorm are no failure, the reason names another)."""
    ops = graph.ops
    every = flow.spoils.get(a, [])
    spoils = [s for s in every if not s.norm] if exact else every
    read = flow.read_nodes.get(a, set())
    n = flow.labelled[a]
    if exact and every and not spoils:
        return _mixed(n, read, flow.norm_nodes.get(a, set())), None
    at: dict[int, Spoil] = {}
    for s in every:
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
        if u.index in at and not (exact and at[u.index].norm):
            s = at[u.index]
            return s.reason, (u if s.norm else None)
        if is_weight_layer(u) or u.kind == "output":
            return (spoils[0].reason if spoils else _unread(n, read)), None
        cur = u


def verdicts(
    graph: OpGraph, flow: Flow, exact: bool = False, never_hidden: Collection[int] = ()
) -> tuple[set[int], dict[int, Why], dict[int, Op]]:
    """Per eligible layer: hidden or not, and why not.

    Args:
        graph: The model's op graph.
        flow: What :func:`propagate` found.
        exact: ``bn_mode="exact"``: routes that end at a training-mode BatchNorm are not named as the
            reason (they make S2 rows, :func:`s2_layers`).
        never_hidden: Labelled ops whose units are never hidden (grouped convolutions: S2 only).

    Returns:
        ``(hidden, ends, normalized)``: the op indices of the layers whose units are hidden; for every
        other eligible layer, why (the reason of its first failing route; after a fork, prefixed with
        the fork); and the layers whose single route ends at a BatchNorm that normalizes them per
        channel, with that BatchNorm (for ``bn_mode="authors_heuristic"``).
    """
    hidden: set[int] = set()
    ends: dict[int, Why] = {}
    normalized: dict[int, Op] = {}
    members = tied_members(flow.ties)
    tied = {m for ms in members.values() for m in ms}
    for a, n in flow.labelled.items():
        if a in tied:
            continue  # decided with its root below
        group = [a, *members.get(a, [])]
        read = set().union(*(flow.read_nodes.get(m, set()) for m in group))
        if a not in never_hidden and not any(flow.spoils.get(m) for m in group) and len(read) == n:
            hidden.add(a)
            continue
        # a stream fails where one of its BatchNorms' routes fails (or, none failing, as its root)
        culprit = next((m for m in group if flow.spoils.get(m)), a)
        why, norm = _why(graph, culprit, flow, exact)
        for m in group:
            ends[m] = why
        if norm is not None:
            normalized[a] = norm
    for a in flow.unlocated:
        ends[a] = Why("its output units cannot be located (unbatched input?)")
    return hidden, ends, normalized


def s2_layers(flow: Flow, candidates: Collection[int]) -> set[int]:
    """The ``candidates`` (labelled weight layers) whose every node reaches a training-mode BatchNorm
    per channel and nothing else: no layer reads them, no other op sees them (S2 rows)."""
    return {
        a
        for a in candidates
        if a in flow.labelled
        and not flow.read_nodes.get(a)
        and all(s.norm for s in flow.spoils.get(a, []))
        and len(flow.norm_nodes.get(a, ())) == flow.labelled[a]
    }
