"""Calling a compiled step's Inductor graph without Dynamo, once the graph is known.

On a small network the compiled step is mostly the cost of *calling* it: Dynamo's frame handling and
guards, then AOTAutograd's wrapper, for a kernel that takes a fraction of that (the 4-conv CNN's step
with momentum: 0.39 ms through ``torch.compile``, 0.23 ms for the graph alone, torch's SGD 0.30 ms;
``benchmarks/README.md``). So the step compiles through ``torch.compile`` as before, with a backend
that is Inductor's own ``compile_fx`` and keeps what it compiled (:class:`InductorCapture`); right
after that call the caller tells which of its tensors were the graph's inputs (:meth:`bind`, by
identity), and later calls with the same structure pass the tensors straight to the graph.

What Dynamo's guards checked is checked here: every input's dtype, device, sizes, strides and
``requires_grad`` (one C++ check over all of them, ``TensorGuards``); a mismatch returns ``False``
and the caller goes through ``torch.compile`` again, which recompiles as it would have. The graph
is bound only when one call compiled exactly one graph whose every input is one of the caller's
tensors, each once (a graph break, a lifted global tensor or an aliased input leave it unbound,
and every call goes through Dynamo).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

try:  # Dynamo's own C++ tensor check (not a public API): without it, every call goes through torch.compile
    from torch._C._dynamo.guards import TensorGuards
except ImportError:  # pragma: no cover - another torch build
    TensorGuards = None


class InductorCapture:
    """A ``torch.compile`` backend: Inductor (``compile_fx`` with ``config``), keeping the last graph.

    Args:
        config: Inductor options (``torch.compile``'s ``options``, less Dynamo's ``guard_filter_fn``).
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.compiles = 0  # graphs compiled so far
        self._last: tuple[Any, list[int]] | None = None  # the last compiled graph, id() of its example inputs
        self.graph: Any = None  # the bound graph (the last one compiled may be another: a recompile)
        self.picks: list[int] | None = None  # per graph input of the bound graph, its position in the caller's list
        self.guards: Any = None
        self.broken = False  # a call compiled more than one graph: never bound again

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        from torch._inductor.compile_fx import compile_fx

        graph = compile_fx(gm, example_inputs, config_patches=self.config)
        self.compiles += 1
        self._last = (graph, [id(x) for x in example_inputs])
        return graph

    def bind(self, tensors: list[Any], compiles_before: int) -> None:
        """After a call through ``torch.compile`` that passed ``tensors`` (a flat list, in the caller's
        fixed order, ``None`` allowed): bind the graph it compiled, if it compiled exactly one."""
        new = self.compiles - compiles_before
        if new == 0 or self.broken or self._last is None:
            return  # a cached graph ran: the binding (if any) stays
        self.picks = self.graph = None
        graph, input_ids = self._last
        self._last = None
        if new > 1:  # a graph break: part of the step ran outside the graph
            self.broken = True
            return
        at: dict[int, int] = {}
        for i, t in enumerate(tensors):
            if isinstance(t, Tensor):
                if id(t) in at:
                    return  # one tensor in two places: Dynamo passes it once
                at[id(t)] = i
        picks = [at.get(i, -1) for i in input_ids]
        if -1 in picks or len(set(picks)) != len(picks):
            return  # an input that is not one of the caller's tensors
        inputs = [tensors[i] for i in picks]
        if TensorGuards is None:
            return
        try:
            self.guards = TensorGuards(
                *inputs,
                dynamic_dims_sizes=[list(t.shape) for t in inputs],
                dynamic_dims_strides=[list(t.stride()) for t in inputs],
            )
        except (TypeError, RuntimeError, SystemError):  # another torch's signature: stay with torch.compile
            return
        self.graph, self.picks = graph, picks

    def call(self, inputs: list[Tensor]) -> bool:
        """Run the bound graph on ``inputs`` (the caller's tensors at :attr:`picks`); ``False`` (nothing
        run) when no graph is bound or an input differs from the bound ones in dtype, device, sizes,
        strides or ``requires_grad``."""
        if self.picks is None or not self.guards.check(*inputs):
            return False
        self.graph(*inputs)
        return True
