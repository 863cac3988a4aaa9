"""The op graph of a model from torch.fx symbolic tracing (see :mod:`lightning_gsgd.topology.graph`)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from lightning_gsgd.topology.graph import (
    JOINS,
    METADATA,
    Op,
    OpGraph,
    canonical,
    func_name,
    is_leaf,
    item_shapes,
    link_users,
    module_params,
    out_shape,
    split_input,
)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_leaf(m)


class _ShapeRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[fx.Node, tuple[int, ...] | None] = {}
        self.items: dict[fx.Node, tuple[tuple[int, ...] | None, ...] | None] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.shapes[n] = out_shape(result)
        self.items[n] = item_shapes(result)
        return result


def trace_fx(model: nn.Module, example_input: Any) -> OpGraph:
    """Trace ``model`` with torch.fx and record output shapes on ``example_input``.

    Raises:
        Exception: Whatever torch.fx raises when the model cannot be traced symbolically.
    """
    tracer = _Tracer()
    graph = tracer.trace(model)
    gm = fx.GraphModule(model, graph)
    args, kwargs = split_input(example_input)
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    values = []
    for n in placeholders:
        key = str(n.target).lstrip("*")
        if key not in bound.arguments:
            raise TypeError(f"cannot map example_input onto forward argument '{key}'")
        values.append(bound.arguments[key])
    interp = _ShapeRecorder(gm)
    with torch.no_grad():
        output = interp.run(*values)

    index: dict[fx.Node, int] = {}
    ops: list[Op] = []
    params = dict(model.named_parameters())
    for n in graph.nodes:
        i = len(ops)
        index[n] = i

        def strip(a: Any) -> Any:
            return None if isinstance(a, fx.Node) else a

        args_ = tuple(fx.node.map_aggregate(a, strip) for a in n.args)
        kwargs_ = {k: fx.node.map_aggregate(v, strip) for k, v in n.kwargs.items()}
        inputs = [index[a] for a in n.all_input_nodes]
        # all_input_nodes lists unique nodes in order of first appearance; that is argument order
        shape = interp.shapes.get(n)
        if n.op == "placeholder":
            ops.append(Op(i, "input", "input", str(n.target), shape=shape))
        elif n.op == "output":
            ops.append(Op(i, "output", "output", "output", inputs=inputs))
        elif n.op == "call_module":
            mod = gm.get_submodule(str(n.target))
            ops.append(
                Op(
                    i,
                    "module",
                    type(mod).__name__,
                    str(n.target),
                    mod,
                    args_,
                    kwargs_,
                    inputs,
                    shape,
                    module_params(mod),
                )
            )
        elif n.op == "get_attr":
            p = params.get(str(n.target))
            name = "parameter" if p is not None else "attribute"
            ops.append(Op(i, "call", name, str(n.target), shape=shape, params=[p] if p is not None else []))
        else:
            name = canonical(str(n.target)) if n.op == "call_method" else func_name(n.target)
            if name == "getattr" and len(n.args) > 1 and isinstance(n.args[1], str):
                name = n.args[1] if n.args[1] in METADATA else "getattr." + n.args[1]
            ops.append(Op(i, "call", name, name, None, args_, kwargs_, inputs, shape))
    for n in graph.nodes:  # the tensors a concatenation joins, in order, repeats kept
        op = ops[index[n]]
        op.items = interp.items.get(n)
        if op.kind == "call" and op.name in JOINS and n.args:
            op.pieces = _pieces(n.args[0], index, ops, interp)
    # a get_attr parameter read by an op counts as that op reading the parameter
    for op in ops:
        for src in op.inputs:
            if ops[src].name == "parameter":
                op.params.extend(ops[src].params)
        if any(ops[s].name == "parameter" for s in op.inputs):
            op.inputs = [-1 if ops[s].name == "parameter" else s for s in op.inputs]
    link_users(ops)
    return OpGraph(ops, "fx", output)


def _pieces(arg: Any, index: dict[fx.Node, int], ops: list[Op], interp: _ShapeRecorder) -> tuple | None:
    """``Op.pieces`` of a concatenation whose first argument is ``arg`` (a list of nodes, or one node
    returning a tuple such as ``chunk``)."""
    if isinstance(arg, fx.Node):
        items = interp.items.get(arg)
        return None if items is None else tuple((index[arg], k, shape) for k, shape in enumerate(items))
    if not isinstance(arg, (list, tuple)):
        return None
    out = []
    for a in arg:
        if not isinstance(a, fx.Node):
            return None
        i = index[a]
        out.append((-1 if ops[i].name == "parameter" else i, None, interp.shapes.get(a)))
    return tuple(out)
