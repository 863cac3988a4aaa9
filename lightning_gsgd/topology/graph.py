"""A model's data flow as a small op graph, from torch.fx tracing or from recording a forward pass.

Detection (:mod:`lightning_gsgd.topology.detect`) reads only this graph, so both front ends produce the same
thing: one :class:`Op` per module call (leaf modules: those of ``torch.nn`` and modules without
children) or torch function / tensor method call, with the producers of its tensor arguments, its
output shape on ``example_input`` and its consumers. Calls that only read metadata (``x.size(0)``,
``x.shape``, ``x.dim()``) are not counted as consumers: they do not carry values.

* :func:`lightning_gsgd.topology.graph_fx.trace_fx` uses ``torch.fx`` symbolic tracing, then runs the
  traced graph once on the example input (eval mode, no grad) to learn the shapes.
* :func:`lightning_gsgd.topology.graph_record.record_forward` runs the model once with forward hooks on its
  leaf modules and a ``TorchFunctionMode`` that sees every torch function and tensor method called
  between them. It works for models that tracing cannot handle (data-dependent control flow), and
  describes the path taken on ``example_input``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

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
        items: For an op that returns a tuple/list of tensors (``chunk``, ``split``), the shape of
            each element (``None`` for a non-tensor element); its readers take them with ``getitem``.
        pieces: For ``cat``/``concat``/``concatenate``, every tensor of the first argument in
            order (repeats kept): ``(producer, element, shape)``, ``element`` the index into the
            producer's ``items`` when the producer returns a tuple (else ``None``), ``producer``
            ``-1`` for a tensor that no op produced.
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
    items: tuple[tuple[int, ...] | None, ...] | None = None
    pieces: tuple[tuple[int, int | None, tuple[int, ...] | None], ...] | None = None

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


def func_name(func: Any) -> str:
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


def out_shape(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, Tensor) else None


def item_shapes(value: Any) -> tuple[tuple[int, ...] | None, ...] | None:
    """The element shapes of a tuple/list output with at least one tensor (``None`` otherwise)."""
    if isinstance(value, (tuple, list)) and any(isinstance(v, Tensor) for v in value):
        return tuple(out_shape(v) for v in value)
    return None


# Ops whose first argument is a sequence of tensors joined along ``dim`` (Op.pieces).
JOINS = frozenset({"cat", "concat", "concatenate"})


def module_params(module: nn.Module) -> list[nn.Parameter]:
    return list(module.parameters())


def link_users(ops: list[Op]) -> None:
    for op in ops:
        if op.kind == "call" and op.name in METADATA:
            continue
        for src in op.inputs:
            if src >= 0 and op.index not in ops[src].users:
                ops[src].users.append(op.index)
