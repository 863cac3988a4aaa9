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
from lightning_gsgd.topology.graph import call_model
from lightning_gsgd.topology.skeleton import random_unit_factors, rescale_hidden_units_
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from lightning_gsgd.topology.types import Topology, TopologyError

_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def default_tolerance(dtype: torch.dtype) -> float:
    """Relative output tolerance of the self-check for outputs of ``dtype``."""
    return _TOLERANCE.get(dtype, 1e-4)


def _float_leaves(out: Any) -> list[Tensor]:
    return [t for t in tree_flatten(out)[0] if isinstance(t, Tensor) and t.is_floating_point()]


def output_deviation(reference: Any, other: Any) -> float:
    """``max |a - b| / max |a|`` over the floating-point tensors of two model outputs."""
    ref, oth = _float_leaves(reference), _float_leaves(other)
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
def _eval_mode(model: nn.Module) -> Iterator[None]:
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
    with _eval_mode(model):
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
    with _eval_mode(model):
        with torch.no_grad():
            ref = call_model(model, example_input) if reference is None else reference
        leaves = _float_leaves(ref)
        tol = tolerance if tolerance is not None else default_tolerance(leaves[0].dtype if leaves else torch.float32)
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
            for li in range(len(chain.layers) - 1):
                gen = generator if generator is not None else torch.Generator().manual_seed(0)
                factors = _factors(topology, spread, gen, (ci, li))
                out = _rescaled_output(model, topology, example_input, factors, topology.chain_params())
                e = output_deviation(ref, out)
                if e > tol:
                    a, b = chain.layers[li], chain.layers[li + 1]
                    raise TopologyError(
                        f"self-check failed in chain {ci} ({chain.name}) at layer '{a.name}': rescaling its "
                        f"{a.n_out} output units (and dividing the matching inputs of '{b.name}', "
                        f"{b.n_in} units x {b.taps} taps) changed the model output by {e:.2e} (relative; "
                        f"tolerance {tol:.0e}). '{a.name}' -> '{b.name}' is not a positively scale-invariant link."
                    )
        raise TopologyError(
            f"self-check failed: rescaling all hidden units changed the model output by {err:.2e} "
            f"(relative; tolerance {tol:.0e}), though no single layer does; the chains interact"
        )
