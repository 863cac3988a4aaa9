"""The op graph of a model from recording one forward pass (see :mod:`lightning_gsgd.topology.graph`).

Used when torch.fx cannot trace the model: forward hooks on the leaf modules record module calls,
and a ``TorchFunctionMode`` records every torch function and tensor method called between them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from lightning_gsgd.topology.graph import (
    JOINS,
    Op,
    OpGraph,
    func_name,
    is_leaf,
    item_shapes,
    link_users,
    module_params,
    out_shape,
    split_input,
)


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
            params = module_params(module)
        op = Op(len(self.ops), kind, name, qualname, module, args_, kwargs_, inputs, out_shape(out), params)
        if kind == "call" and name in JOINS and args and isinstance(args[0], (list, tuple)):
            if all(isinstance(t, Tensor) for t in args[0]):
                op.pieces = tuple((self._source(t), None, tuple(t.shape)) for t in args[0])
        self.ops.append(op)
        op.items = item_shapes(out)
        if op.items is not None:  # one getitem op per element, as torch.fx records tuple unpacking
            for k, t in enumerate(out):
                if isinstance(t, Tensor):
                    item = Op(
                        len(self.ops), "call", "getitem", "getitem", None, (None, k), {}, [op.index], tuple(t.shape)
                    )
                    self.ops.append(item)
                    self.producer[id(t)] = item.index
                    self.keep.append(t)
            return
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self.producer[id(t)] = op.index
                self.keep.append(t)

    def _source(self, t: Tensor) -> int:
        return -1 if id(t) in self.param_ids else self.producer.get(id(t), -1)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0:
            name = func_name(func)
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
    link_users(rec.ops)
    return OpGraph(rec.ops, "record", out)
