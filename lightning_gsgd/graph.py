"""A model's data flow as a small op graph, from torch.fx tracing or from recording a forward pass.

Detection (:mod:`lightning_gsgd.detect`) reads only this graph, so both front ends produce the same
thing: one :class:`Op` per module call (leaf modules: those of ``torch.nn`` and modules without
children) or torch function / tensor method call, with the producers of its tensor arguments, its
output shape on ``example_input`` and its consumers. Calls that only read metadata (``x.size(0)``,
``x.shape``, ``x.dim()``) are not counted as consumers: they do not carry values.

* :func:`trace_fx` uses ``torch.fx`` symbolic tracing, then runs the traced graph once on the
  example input (eval mode, no grad) to learn the shapes.
* :func:`record_forward` runs the model once with forward hooks on its leaf modules and a
  ``TorchFunctionMode`` that sees every torch function and tensor method called between them. It
  works for models that tracing cannot handle (data-dependent control flow), and describes the
  path taken on ``example_input``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

# Calls that read a tensor's metadata, not its values.
METADATA = frozenset(
    {
        "size",
        "dim",
        "ndimension",
        "numel",
        "nelement",
        "shape",
        "ndim",
        "dtype",
        "device",
        "is_contiguous",
        "stride",
        "layout",
        "requires_grad",
        "is_cuda",
        "get_device",
        "__len__",
        "len",
        "getattr",
    }
)


@dataclass
class Op:
    """One call in the forward pass.

    Attributes:
        index: Position in :attr:`OpGraph.ops`.
        kind: ``"input"``, ``"module"``, ``"call"`` (function or tensor method) or ``"output"``.
        name: Canonical op name: the module's class name, or the function/method name without a
            trailing in-place underscore (``"relu"`` for ``F.relu``, ``torch.relu``, ``x.relu_()``).
        qualname: For modules, the qualified module name in the model (``"layer1.0.conv1"``);
            for calls, the same as ``name``.
        module: The module, for ``kind == "module"``.
        args: Positional arguments with every tensor produced by an op replaced by ``None`` (the
            producers are in :attr:`inputs`), for reading constants such as reduction dims.
        kwargs: Keyword arguments, same convention.
        inputs: Producers of the tensor arguments, in argument order (``-1``: a tensor that no op
            produced, e.g. a parameter or a constant).
        shape: Output shape on the example input, or ``None`` if the output is not one tensor.
        params: Parameters this op reads (a module's own parameters, or parameters passed to a call).
        users: Ops that read this op's output values (metadata reads excluded).
    """

    index: int
    kind: str
    name: str
    qualname: str
    module: nn.Module | None = None
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    inputs: list[int] = field(default_factory=list)
    shape: tuple[int, ...] | None = None
    params: list[nn.Parameter] = field(default_factory=list)
    users: list[int] = field(default_factory=list)

    @property
    def data_input(self) -> int:
        """Producer of the first tensor argument (``-1`` if none)."""
        return self.inputs[0] if self.inputs else -1

    def describe(self) -> str:
        """``"LayerNorm 'ln2'"`` for modules, ``"gelu"`` for calls."""
        return f"{self.name} '{self.qualname}'" if self.kind == "module" else self.name


@dataclass
class OpGraph:
    """The ops of one forward pass, in execution order, and how the graph was obtained."""

    ops: list[Op]
    method: str  # "fx" or "record"
    output: Any = None  # the model's output on the example input (eval mode, no grad)

    def __iter__(self) -> Iterator[Op]:
        return iter(self.ops)


def call_model(model: nn.Module, example_input: Any) -> Any:
    """Call ``model`` on ``example_input`` the way Lightning does with ``example_input_array``.

    A tuple or list is unpacked into positional arguments, a dict into keyword arguments, anything
    else is passed as the single argument (wrap a dict that ``forward`` takes as one argument in a
    tuple: ``(batch,)``).
    """
    args, kwargs = split_input(example_input)
    return model(*args, **kwargs)


def split_input(example_input: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` for :func:`call_model`'s convention."""
    if isinstance(example_input, dict):
        return (), dict(example_input)
    if isinstance(example_input, (tuple, list)):
        return tuple(example_input), {}
    return (example_input,), {}


def canonical(name: str) -> str:
    """Op name without the in-place suffix and dunder wrapping (``add_`` -> ``add``, ``__add__`` -> ``add``)."""
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
        if name.startswith("i") and name[1:] in {"add", "sub", "mul", "truediv", "and", "or"}:
            name = name[1:]
    elif name.endswith("_") and not name.startswith("_"):
        name = name[:-1]
    return name


def _func_name(func: Any) -> str:
    name = getattr(func, "__name__", None) or type(func).__name__
    if name == "__get__" and hasattr(func, "__self__"):  # tensor property such as .shape
        name = getattr(func.__self__, "__name__", name)
    return canonical(name)


def is_leaf(module: nn.Module) -> bool:
    """Leaf modules are treated as one op: modules of ``torch.nn`` (except containers) and childless ones."""
    if isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return False
    mod = type(module).__module__
    return mod.startswith("torch.nn") or mod.startswith("torch.ao.nn") or next(module.children(), None) is None


def _shape(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, Tensor) else None


def _module_params(module: nn.Module) -> list[nn.Parameter]:
    return list(module.parameters())


def _link_users(ops: list[Op]) -> None:
    for op in ops:
        if op.kind == "call" and op.name in METADATA:
            continue
        for src in op.inputs:
            if src >= 0 and op.index not in ops[src].users:
                ops[src].users.append(op.index)


# ---------------------------------------------------------------------------------------- fx


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_leaf(m)


class _ShapeRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[fx.Node, tuple[int, ...] | None] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.shapes[n] = _shape(result)
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
                    _module_params(mod),
                )
            )
        elif n.op == "get_attr":
            p = params.get(str(n.target))
            name = "parameter" if p is not None else "attribute"
            ops.append(Op(i, "call", name, str(n.target), shape=shape, params=[p] if p is not None else []))
        else:
            name = canonical(str(n.target)) if n.op == "call_method" else _func_name(n.target)
            if name == "getattr" and len(n.args) > 1 and isinstance(n.args[1], str):
                name = n.args[1] if n.args[1] in METADATA else "getattr." + n.args[1]
            ops.append(Op(i, "call", name, name, None, args_, kwargs_, inputs, shape))
    # a get_attr parameter read by an op counts as that op reading the parameter
    for op in ops:
        for src in op.inputs:
            if ops[src].name == "parameter":
                op.params.extend(ops[src].params)
        if any(ops[s].name == "parameter" for s in op.inputs):
            op.inputs = [-1 if ops[s].name == "parameter" else s for s in op.inputs]
    _link_users(ops)
    return OpGraph(ops, "fx", output)


# ---------------------------------------------------------------------------------------- record


class _Recorder(TorchFunctionMode):
    """Records every torch call made outside leaf modules, and the leaf module calls themselves."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.ops: list[Op] = []
        self.producer: dict[int, int] = {}  # id(tensor) -> op index
        self.keep: list[Any] = []  # keeps recorded tensors alive so their ids are not reused
        self.depth = 0
        self.param_ids = {id(p) for p in model.parameters()}

    def _inputs(self, args: Any, kwargs: Any) -> tuple[list[int], list[nn.Parameter], Any, Any]:
        inputs: list[int] = []
        params: list[nn.Parameter] = []

        def strip(a: Any) -> Any:
            if isinstance(a, Tensor):
                if id(a) in self.param_ids:
                    params.append(a)  # type: ignore[arg-type]
                    inputs.append(-1)
                else:
                    inputs.append(self.producer.get(id(a), -1))
                return None
            return a

        flat_args, _ = tree_flatten((args, kwargs))
        for a in flat_args:
            strip(a)
        args_ = tuple(a if not isinstance(a, Tensor) else None for a in args)
        kwargs_ = {k: (v if not isinstance(v, Tensor) else None) for k, v in kwargs.items()}
        return inputs, params, args_, kwargs_

    def add(self, kind: str, name: str, qualname: str, module: Any, args: Any, kwargs: Any, out: Any) -> None:
        inputs, params, args_, kwargs_ = self._inputs(args, kwargs)
        if module is not None:
            params = _module_params(module)
        op = Op(len(self.ops), kind, name, qualname, module, args_, kwargs_, inputs, _shape(out), params)
        self.ops.append(op)
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self.producer[id(t)] = op.index
                self.keep.append(t)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0:
            name = _func_name(func)
            self.add("call", name, name, None, args, kwargs, out)
        return out


def record_forward(model: nn.Module, example_input: Any) -> OpGraph:
    """Run ``model`` once on ``example_input`` (eval mode, no grad) and record the executed ops."""
    rec = _Recorder(model)
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    handles = []

    def pre(mod: nn.Module, args: Any, kwargs: Any) -> None:
        rec.depth += 1

    def post(mod: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        rec.depth -= 1
        if rec.depth == 0:
            rec.depth += 1  # hide our own metadata reads from the recorder
            try:
                rec.add("module", type(mod).__name__, names.get(id(mod), "?"), mod, args, kwargs, out)
            finally:
                rec.depth -= 1

    for _, m in model.named_modules():
        if m is not model and is_leaf(m):
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True))
    args, kwargs = split_input(example_input)
    flat, _ = tree_flatten((args, kwargs))
    for i, t in enumerate(flat):
        if isinstance(t, Tensor):
            rec.add("input", "input", f"input{i}", None, (), {}, t)
    try:
        with torch.no_grad(), rec:
            out = model(*args, **kwargs)
            rec.depth += 1
            rec.add("output", "output", "output", None, (out,), {}, None)
            rec.depth -= 1
    finally:
        for h in handles:
            h.remove()
    _link_users(rec.ops)
    return OpGraph(rec.ops, "record", out)
