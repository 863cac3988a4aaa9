"""Prove a topology on the model: rescaling its hidden units must not change the model's outputs.

Positive scaling of a hidden unit (incoming weights and bias times ``c``, outgoing weights divided
by ``c``) leaves a ReLU network's function unchanged exactly when the topology is right. These
functions apply random scalings to the model **in place**, run ``example_input`` in eval mode, and
restore the saved parameter values bit for bit and every submodule's train/eval flag (also when the
forward pass raises). This is the library's one implementation of that check: detection uses
:func:`check_invariance`, the Lightning callback's periodic check uses :func:`invariance_error`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from lightning_gsgd.topology.graph import call_model
from lightning_gsgd.topology.skeleton import random_unit_factors, rescale_hidden_units_
from lightning_gsgd.topology.types import Topology, TopologyError

_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def defaultresolve_tolerance(dtype: torch.dtype) -> float:
    """Relative output tolerance of the self-check for outputs of ``dtype``."""
    return _TOLERANCE.get(dtype, 1e-4)


def resolve_tolerance(reference: Any, tolerance: float | None) -> float:
    """``tolerance``, or the default for the dtype of ``reference``'s first floating-point tensor."""
    if tolerance is not None:
        return tolerance
    leaves = float_leaves(reference)
    return defaultresolve_tolerance(leaves[0].dtype if leaves else torch.float32)


def float_leaves(out: Any) -> list[Tensor]:
    """The floating-point tensors of a model output (any nesting of tuples, lists, dicts)."""
    return [t for t in tree_flatten(out)[0] if isinstance(t, Tensor) and t.is_floating_point()]


def output_deviation(reference: Any, other: Any) -> float:
    """``max |a - b| / max |a|`` over the floating-point tensors of two model outputs."""
    ref, oth = float_leaves(reference), float_leaves(other)
    if len(ref) != len(oth):
        raise TopologyError("self-check: the model returned a different output structure after rescaling")
    if not ref:
        raise TopologyError("self-check: the model output holds no floating-point tensor to compare")
    diff = max(float((a.double() - b.double()).abs().max()) if a.numel() else 0.0 for a, b in zip(ref, oth))
    scale = max(float(a.double().abs().max()) if a.numel() else 0.0 for a in ref)
    return diff / scale if scale > 0 else diff


def _factors(topology: Topology, spread: float, generator: torch.Generator, only: tuple[int, int] | None) -> list:
    factors = random_unit_factors(topology, spread, generator)
    if only is not None:
        for ci, chain_factors in enumerate(factors):
            for li in range(len(chain_factors)):
                if (ci, li) != only:
                    chain_factors[li] = torch.ones_like(chain_factors[li])
    return factors


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside; afterwards every submodule's own ``training`` flag as it was (not ``model.train()``,
    which would also switch on submodules the user keeps in eval mode, e.g. a frozen BatchNorm)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@torch.no_grad()
def _rescaled_output(
    model: nn.Module, topology: Topology, example_input: Any, factors: list, params: list[nn.Parameter]
) -> Any:
    saved = [p.detach().clone() for p in params]
    try:
        rescale_hidden_units_(topology, factors)
        return call_model(model, example_input)
    finally:
        for p, s in zip(params, saved):
            p.copy_(s)


def invariance_error(
    model: nn.Module,
    topology: Topology,
    example_input: Any,
    *,
    spread: float = 1.0,
    generator: torch.Generator | None = None,
    reference: Any = None,
) -> float:
    """Relative change of the model's outputs when every hidden unit is rescaled at random.

    The model runs in eval mode without gradients; its parameters are rescaled in place and then
    restored exactly, and every submodule's training flag is restored.

    Cost: two forward passes on ``example_input`` (one if ``reference`` is given), one copy of the
    chain parameters, and a host synchronization (the result is a Python float). With the same
    ``generator`` seed, every process of a distributed run gets the same value.

    Args:
        model: The model the topology was detected on.
        topology: The topology to test.
        example_input: A batch the model accepts (tensor; tuple/list: positional arguments; dict:
            keyword arguments).
        spread: Factors are ``exp(U(-spread, spread))``.
        generator: Random generator for the factors (default: a fresh one seeded with 0).
        reference: The model's eval-mode output on ``example_input``, if already computed.

    Returns:
        ``max |y' - y| / max |y|`` over the floating-point outputs (0 for a topology without chains).
    """
    if not topology.chains:
        return 0.0
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    with eval_mode(model):
        with torch.no_grad():
            ref = call_model(model, example_input) if reference is None else reference
        out = _rescaled_output(
            model, topology, example_input, _factors(topology, spread, gen, None), topology.chain_params()
        )
    return output_deviation(ref, out)


def check_invariance(
    model: nn.Module,
    topology: Topology,
    example_input: Any,
    *,
    tolerance: float | None = None,
    spread: float = 1.0,
    generator: torch.Generator | None = None,
    reference: Any = None,
) -> float:
    """Raise if rescaling the hidden units of ``topology`` changes the model's outputs.

    On failure each hidden layer is rescaled alone to name the chain and layer at fault.

    Args:
        model: The model the topology was detected on.
        topology: The topology to prove.
        example_input: A batch the model accepts (see :func:`invariance_error`).
        tolerance: Largest allowed relative output change (default: by output dtype, 1e-9 for
            float64, 1e-4 for float32).
        spread: Factors are ``exp(U(-spread, spread))``.
        generator: Random generator for the factors (default: seeded with 0).
        reference: The model's eval-mode output on ``example_input``, if already computed.

    Returns:
        The measured relative deviation.

    Raises:
        TopologyError: The outputs changed; the message names the chain and the layer whose
            hidden units broke the invariance.
    """
    if not topology.chains:
        return 0.0
    with eval_mode(model):
        with torch.no_grad():
            ref = call_model(model, example_input) if reference is None else reference
        tol = resolve_tolerance(ref, tolerance)
        err = invariance_error(model, topology, example_input, spread=spread, generator=generator, reference=ref)
        if err <= tol:
            return err
        with torch.no_grad():
            again = call_model(model, example_input)
        if output_deviation(ref, again) > tol:
            raise TopologyError(
                "self-check: the model's eval-mode output differs between two identical forward passes, "
                "so the topology cannot be verified; make forward deterministic in eval mode or pass "
                "self_check=False"
            )
        for ci, chain in enumerate(topology.chains):
            for k, li in enumerate(chain.hidden_layers):
                e = _layer_error(model, topology, example_input, ref, spread, generator, ci, k)
                if e > tol:
                    raise TopologyError(link_failure(topology, ci, li, e, tol))
        raise TopologyError(interaction_failure(err, tol))


def link_failure(topology: Topology, ci: int, li: int, error: float, tol: float) -> str:
    """The self-check's message for hidden layer ``li`` of chain ``ci`` and the layers that read it
    (a sequence: the link from layer ``li`` to ``li + 1``)."""
    chain = topology.chains[ci]
    a = chain.layers[li]
    readers = [chain.layers[m] for m in dict.fromkeys(m for m, _, _ in chain.readers(li))]
    inputs = ", ".join(f"'{b.name}', {b.n_in} units x {b.taps} taps" for b in readers[:3])
    names = ", ".join(f"'{b.name}'" for b in readers[:3]) + (", ..." if len(readers) > 3 else "")
    return (
        f"self-check failed in chain {ci} ({chain.name}) at layer '{a.name}': rescaling its "
        f"{a.n_out} output units (and dividing the matching inputs of {inputs}) changed the model output by "
        f"{error:.2e} (relative; tolerance {tol:.0e}). '{a.name}' -> {names} is not a positively scale-invariant link."
    )


def interaction_failure(error: float, tol: float) -> str:
    """The self-check's message when all units together break invariance and no single layer does."""
    return (
        f"self-check failed: rescaling all hidden units changed the model output by {error:.2e} "
        f"(relative; tolerance {tol:.0e}), though no single layer does; the chains interact"
    )


def _layer_error(
    model: nn.Module,
    topology: Topology,
    example_input: Any,
    ref: Any,
    spread: float,
    generator: torch.Generator | None,
    ci: int,
    li: int | None,
) -> float:
    """Output change when only the ``li``-th hidden layer of chain ``ci`` (``None``: every hidden layer of it)
    is rescaled."""
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    factors = _factors(topology, spread, gen, None)
    for cj, chain_factors in enumerate(factors):
        for lj in range(len(chain_factors)):
            if cj != ci or (li is not None and lj != li):
                chain_factors[lj] = torch.ones_like(chain_factors[lj])
    out = _rescaled_output(model, topology, example_input, factors, topology.chain_params())
    return output_deviation(ref, out)


def self_check_errors(
    model: nn.Module,
    topology: Topology,
    example_input: Any,
    *,
    tolerance: float | None = None,
    spread: float = 1.0,
    generator: torch.Generator | None = None,
    reference: Any = None,
) -> tuple[float, float, list[tuple[int, int, float]], list[tuple[int, float]]]:
    """Where a topology fails the self-check, for detection to drop what fails and keep the rest.

    Returns:
        ``(error, tolerance, bad_links, bad_chains)``: the relative output change with every hidden
        unit rescaled; the tolerance used; when the error exceeds it, every ``(chain, layer, error)``
        whose hidden units alone break invariance (the link ``layer -> layer + 1``); and, only when no
        single link does, every ``(chain, error)`` whose units alone break it. Both lists are empty
        when the topology passes.

    Raises:
        TopologyError: The eval-mode output differs between two identical forward passes.
    """
    if not topology.chains:
        return 0.0, 0.0, [], []
    with eval_mode(model):
        with torch.no_grad():
            ref = call_model(model, example_input) if reference is None else reference
            tol = resolve_tolerance(ref, tolerance)
            err = invariance_error(model, topology, example_input, spread=spread, generator=generator, reference=ref)
            if err <= tol:
                return err, tol, [], []
            again = call_model(model, example_input)
            if output_deviation(ref, again) > tol:
                raise TopologyError(
                    "self-check: the model's eval-mode output differs between two identical forward passes, "
                    "so the topology cannot be verified; make forward deterministic in eval mode or pass "
                    "self_check=False"
                )
            links: list[tuple[int, int, float]] = []
            for ci, chain in enumerate(topology.chains):
                for k, li in enumerate(chain.hidden_layers):
                    e = _layer_error(model, topology, example_input, ref, spread, generator, ci, k)
                    if e > tol:
                        links.append((ci, li, e))
            chains: list[tuple[int, float]] = []
            if not links:
                for ci in range(len(topology.chains)):
                    e = _layer_error(model, topology, example_input, ref, spread, generator, ci, None)
                    if e > tol:
                        chains.append((ci, e))
    return err, tol, links, chains
