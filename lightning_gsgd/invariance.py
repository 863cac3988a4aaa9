"""A numerical self-check of a topology: rescaling hidden units must not change the model's output."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gsgd.skeleton import random_unit_factors, rescale_hidden_units_
from lightning_gsgd.topology import Topology


@torch.no_grad()
def invariance_residual(
    model: nn.Module,
    topology: Topology,
    example_input: Any,
    *,
    spread: float = 1.0,
    generator: torch.Generator | None = None,
    forward: Callable[[nn.Module, Any], Tensor] | None = None,
) -> Tensor:
    """Check that positive rescaling of hidden units leaves the model's output unchanged.

    Rescales every hidden unit of every chain of ``model`` in place by ``exp(U(-spread, spread))``,
    runs the model in eval mode on ``example_input`` before and after, then restores the parameters
    bit for bit (from a copy) and the train/eval mode, even if the forward raises. A residual at
    rounding level says the topology is right; a large one names a wrong chain (a non-homogeneous
    map inside it, or a layer read by something outside the chain).

    Cost (off by default in the callback): two forward passes on ``example_input`` without
    gradients, one copy of the chain parameters, and one host synchronization (checking the
    factors are positive). Use the same ``generator`` seed on every rank to get the same value.

    Args:
        model: The model the topology was detected on.
        topology: Its topology.
        example_input: A batch ``model`` accepts.
        spread: Log-scale half-width of the random factors.
        generator: Random generator for the factors (CPU).
        forward: ``forward(model, example_input) -> Tensor``; default ``model(example_input)``.

    Returns:
        ``max |f_rescaled(x) - f(x)| / max |f(x)|`` as a 0-d tensor (0 when ``f(x)`` is all zero and
        unchanged).

    Raises:
        TypeError: The forward does not return a tensor.
    """
    run = forward if forward is not None else (lambda m, x: m(x))
    params = topology.chain_params()
    saved = [p.detach().clone() for p in params]
    was_training = model.training
    model.eval()
    try:
        ref = run(model, example_input)
        if not isinstance(ref, Tensor):
            raise TypeError(
                f"invariance_residual: the model returned {type(ref).__name__}; pass forward= to pick a tensor"
            )
        rescale_hidden_units_(topology, random_unit_factors(topology, spread, generator))
        out = run(model, example_input)
    finally:
        for p, s in zip(params, saved):
            p.copy_(s)
        model.train(was_training)
    scale = ref.abs().max()
    diff = (out - ref).abs().max()
    return torch.where(scale > 0, diff / scale, diff)
