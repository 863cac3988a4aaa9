"""Why each parameter outside the chains is there, in words that name the modules (see :mod:`.reasons`).

Detection (:mod:`lightning_gsgd.topology.detect`) finds, for every Linear/Conv layer, either its own
problem or where its chain ends; :func:`param_reasons` turns that into one reason per parameter, each
with its group (the same cause without names) for short messages.
"""

from __future__ import annotations

from lightning_gsgd.topology.graph import Op, OpGraph
from lightning_gsgd.topology.reasons import TRANSPOSED_CONVS, Why, group_of
from lightning_gsgd.topology.rules import ELEMENTWISE, RESHAPE, SPATIAL, is_weight_layer


def feeder(graph: OpGraph, op: Op) -> tuple[str, str]:
    """What feeds a weight layer, skipping homogeneous ops (for exclusion messages): the text, and
    the same without the module's name."""
    ops = graph.ops
    src = op.data_input
    while src >= 0 and (
        ops[src].name in ELEMENTWISE | SPATIAL | RESHAPE
        or (ops[src].name == "getitem" and ops[src].data_input >= 0 and ops[ops[src].data_input].shape is None)
    ):  # an element of a tuple output (the recorder makes one getitem per element, as torch.fx does)
        src = ops[src].data_input
    if src < 0:
        return "a constant", "a constant"
    s = ops[src]
    if s.kind == "input":
        return "the model input", "the model input"
    if is_weight_layer(s):
        return f"'{s.qualname}'", "a Linear/Conv layer"
    return s.describe(), s.name


def param_reasons(graph: OpGraph, problems: dict[int, Why | None], ends: dict[int, Why]) -> dict[int, Why]:
    """Why each parameter the graph reads is in no chain, by ``id``: its layer's own problem
    (``problems``), or where the layer's chain ends (``ends``) and what feeds it; a parameter of
    another module or of a functional call says so."""
    reasons: dict[int, Why] = {}
    for op in graph:
        if op.kind == "module" and op.module is not None and is_weight_layer(op):
            problem = problems[op.index]
            if problem is not None:
                why = Why(f"'{op.qualname}': {problem}", group_of(problem))
            else:
                after = ends.get(op.index) or Why("-")
                before, fed_by = feeder(graph, op)
                group = group_of(after)
                if after == "model output":
                    group = f"the model's output layer, fed by {fed_by}"
                why = Why(
                    f"'{op.qualname}' is in no ReLU chain (after it: {after}; before it: {before})",
                    f"in no ReLU chain: {group}",
                )
            for p in op.params:
                reasons.setdefault(id(p), why)
        elif op.kind == "module":
            if op.name in TRANSPOSED_CONVS:
                why = Why(
                    f"parameter of {op.describe()}: {op.name} is not supported yet (only nn.Linear and "
                    "nn.Conv1d/2d/3d modules are chain layers)",
                    f"{op.name} is not supported yet",
                )
            else:
                why = Why(
                    f"parameter of {op.describe()} (not a Linear/Conv layer)",
                    f"parameter of a {op.name} (not a Linear/Conv layer)",
                )
            for p in op.params:
                reasons.setdefault(id(p), why)
        elif op.name != "parameter":  # torch.fx's read of a parameter: its readers list it too
            for p in op.params:
                reasons.setdefault(
                    id(p), Why(f"read by a '{op.name}' call (only nn.Linear/nn.ConvNd modules are chain layers)")
                )
    return reasons
