"""What the G-space optimizers share: the hyper-parameter checks, the bind check, the start of a step and the
decorator of ``step`` (:func:`g_step`)."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from lightning_gsgd.topology.types import Topology, TopologyError


def check_hyper(h: dict[str, Any], where: str) -> None:
    """Raise a ValueError naming the first out-of-range SGD hyper-parameter of ``h`` and its valid range.

    Stricter than ``torch.optim.SGD`` where a value can only diverge: momentum must be below 1 (at 1 or
    above the path-space momentum buffer grows without bound and every later step is skipped).
    """
    lr, momentum, dampening, wd = h["lr"], h["momentum"], h["dampening"], h["weight_decay"]
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(f"{where}: a tensor lr must have exactly one element, got shape {tuple(lr.shape)}")
    if not lr >= 0.0:  # also refuses NaN
        raise ValueError(f"{where}: invalid learning rate lr={lr}; it must be >= 0")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"{where}: invalid momentum={momentum}; it must be in [0, 1)")
    if not wd >= 0.0:
        raise ValueError(f"{where}: invalid weight_decay={wd}; it must be >= 0")
    if not math.isfinite(wd):
        raise ValueError(f"{where}: invalid weight_decay={wd}; it must be finite")
    if not 0.0 <= dampening <= 1.0:
        raise ValueError(f"{where}: invalid dampening={dampening}; it must be in [0, 1]")
    if h["nesterov"] and (momentum <= 0 or dampening != 0):
        raise ValueError(f"{where}: nesterov=True requires momentum > 0 and dampening = 0")


def check_chain_params(topology: Topology, param_groups: list[dict[str, Any]], name: str) -> set[int]:
    """Check that every chain weight and bias is a trainable parameter of the optimizer ``name``.

    Returns:
        The ids of the optimizer's parameters.

    Raises:
        TopologyError: A chain parameter is not in ``param_groups`` or is frozen (the message names
            the layer).
    """
    owned = {id(p) for group in param_groups for p in group["params"]}
    layers = [layer for chain in topology.chains for layer in chain.layers] + list(topology.normalized)
    for layer in layers:
        named = [("weight", layer.weight), ("bias", layer.bias)]
        named += [(f"tied parameter '{n}'", t) for n, t in zip(layer.tied_names, layer.tied)]
        for kind, p in named:
            if p is None:
                continue
            if id(p) not in owned:
                raise TopologyError(
                    f"{name}: the {kind} of layer '{layer.name}' is not among this optimizer's "
                    "parameters: was the topology built for a different model, were "
                    "parameters left out of the optimizer, or was the model sharded by fully_shard after "
                    "detection (then pass lightning_gsgd.shard_topology(topology, model))?"
                )
            if not p.requires_grad:
                raise TopologyError(
                    f"{name}: the {kind} of layer '{layer.name}' is frozen (requires_grad=False); "
                    "exclude that layer from the topology"
                )
    return owned


def chain_owned_ids(topology: Topology) -> set[int]:
    """Ids of the parameters a chain step owns: every chain weight, hidden bias and tied parameter (a chain's output
    bias is no path value and takes the plain rule, like every parameter outside chains), and the
    weights of BN-heuristic layers and of S2 layers outside chains (their biases take the plain rule)."""
    owned = {id(layer.weight) for layer in (*topology.bn_layers, *topology.normalized)}
    for chain in topology.chains:
        for layer, hidden in zip(chain.layers, chain.hidden):
            owned.add(id(layer.weight))
            if layer.bias is not None and hidden:
                owned.add(id(layer.bias))
            owned.update(id(t) for t in layer.tied)  # hidden biases too (tied residual-stream BatchNorms)
    return owned


def begin_step(closure: Callable[[], Any] | None, topology: Topology | None, unbound: str) -> Any:
    """Run the closure (under ``torch.enable_grad``) and refuse an optimizer without a topology.

    Returns:
        The closure's loss, or ``None``.

    Raises:
        RuntimeError: ``topology`` is ``None`` (message ``unbound``).
    """
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    if topology is None:
        raise RuntimeError(unbound)
    return loss


_Step = TypeVar("_Step", bound=Callable[..., Any])


def g_step(step: _Step) -> _Step:
    """Decorate a G-space optimizer's ``step``: run it under ``torch.no_grad()``, and keep the step counters
    exact across the step torch's distributed checkpointing takes itself.

    ``torch.distributed.checkpoint.state_dict`` (``get_optimizer_state_dict``, ``set_optimizer_state_dict``;
    Lightning's ``ModelParallelStrategy`` saves and loads through them) calls ``_init_optim_state`` on an
    optimizer without state and without gradients: it sets every gradient to zeros and the learning rates to
    0 and calls ``step()`` to create the state tensors. That step changes no weight, but it would count in
    ``steps`` (and could count in the other counters), so around it every counter is put back to its value
    before it, in place (a tensor returned by ``counters()`` stays the live counter).
    """

    @functools.wraps(step)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            if not _called_by_torch_state_init():
                return step(self, *args, **kwargs)
            counters = self._counters.tensors
            before = {k: v.clone() for k, v in counters.items()}
            try:
                return step(self, *args, **kwargs)
            finally:
                for k, v in counters.items():
                    v.copy_(before[k]) if k in before else v.zero_()

    return wrapper  # type: ignore[return-value]


def _called_by_torch_state_init(depth: int = 14) -> bool:
    """Whether ``torch.distributed.checkpoint.state_dict._init_optim_state`` is among the callers."""
    frame = inspect.currentframe()
    for _ in range(depth):
        if frame is None:
            return False
        code = frame.f_code
        if code.co_name == "_init_optim_state" and "checkpoint" in code.co_filename:
            return True
        frame = frame.f_back
    return False
