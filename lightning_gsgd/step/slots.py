"""The data a chain's eager step passes between its phases: the tensors it steps (:class:`Slot`), the
chain after its O(H) phase (:class:`Prepared`), and the diagnostics read off it (:class:`ChainReading`).

These types live below the code that uses them (:mod:`~lightning_gsgd.step.chain_step`,
:mod:`~lightning_gsgd.step.passes`, :mod:`~lightning_gsgd.step.readings`) so that none of those modules
imports another in a loop.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from lightning_gsgd.step.hyper import Hyper
from lightning_gsgd.step.work import ChainWork


@dataclass
class ChainReading:
    """By-products of one chain's step (0-d tensors unless noted), in the parameters' dtype.

    Attributes:
        grad_sq: Sum of ``(dL/dv)^2`` over the basis paths, before the step.
        value_sq: Sum of ``v^2`` over the basis paths, before the step.
        skeleton_abs: ``|v|`` of the skeleton paths (free tau edges), before the step (1-D).
        imbalance_terms: ``log(||incoming|| / ||outgoing||)`` per hidden unit, before the step (1-D).
        update_sq: ``||v' - v||^2`` over the basis paths across the step (0 for a skipped step);
            ``None`` until the step has been written.
    """

    grad_sq: Tensor
    value_sq: Tensor
    skeleton_abs: Tensor
    imbalance_terms: Tensor
    update_sq: Tensor | None = None


@dataclass
class Slot:
    """One chain tensor (a layer's weight or hidden bias) and where its step is written.

    Attributes:
        param: The parameter (weight as ``[n_out, n_in, taps]`` view, or bias).
        grad: Its gradient, same shape (zeros if the weight had none).
        hp: Hyper-parameters of the parameter's group.
        buf: The momentum buffer in path coordinates (``None`` before the first step).
        target: Where the new value is written (``param`` itself, or a scratch copy).
        buf_target: Where the new buffer is written: the caller sets it to the buffer (or a copy)
            when there is one; the step sets it to a new tensor on the first momentum step.
        owner: The ``nn.Parameter`` itself (the optimizer's state key).
    """

    param: Tensor
    grad: Tensor
    hp: Hyper
    buf: Tensor | None
    target: Tensor
    buf_target: Tensor | None = None
    owner: Tensor | None = None


@dataclass
class Prepared:
    """A chain after :func:`prepare_chain`: its slots, and every O(H) quantity of its step.

    Attributes:
        work: The chain's work area (holds the gathered values and the per-row factors).
        weights: One :class:`Slot` per layer weight.
        biases: One :class:`Slot` (or ``None``) per layer; the last layer's bias is never here. Then
            one per tied parameter, in the order of ``ChainPlan.tied_layer`` (``None``: no gradient).
        momentum: Whether any weight has momentum (the buffer block was gathered).
        last_check: ``[min, max]`` of the last layer's weight gradient (its rows need no sums).
        unit_b: Whether every ``B`` is 1 (row-only scaling); ``False`` also when not known.
        hits: 0-d int64 tensor, the number of free tau path values the guard clamped.
        factor_check: Finite exactly when the per-row factors and new skeleton values are finite
            and every new ``F'`` is above the floor (see :func:`prepare_chain`).
        tau_buf: Whether the new tau buffer entries were written into the work area.
        bias_params: With readings requested, every layer's bias (``None`` where there is none).
        reading: With readings requested, the before-step diagnostics (:mod:`lightning_gsgd.step.readings`).
        tau_aux: With readings requested, the O(H) intermediates the readings need.
        row_sq: With readings requested, the per-row sums of squares the readings computed.
    """

    work: ChainWork
    weights: list[Slot]
    biases: list[Slot | None]
    momentum: bool
    last_check: Tensor
    unit_b: bool
    hits: Tensor
    factor_check: Tensor
    tau_buf: bool
    bias_params: list[Tensor | None] | None = None
    reading: ChainReading | None = None
    tau_aux: dict[str, Tensor] | None = None
    row_sq: tuple[list[Tensor], list[Tensor]] | None = None

    def slots(self) -> list[Slot]:
        """Every weight and bias slot."""
        return [*self.weights, *(b for b in self.biases if b is not None)]

    def input_checks(self) -> list[Tensor]:
        """The gradient values checked directly: ``[min, max]`` of the last layer's gradient (a NaN or inf
        loss reaches every gradient, that one included)."""
        return [self.last_check]

    def factor_check_values(self) -> list[Tensor]:
        """Values that are all finite exactly when the per-row sums ``sum(w * g)`` (which also check the
        hidden layers' gradients) and the step's O(H) factors are (see :func:`prepare_chain`)."""
        return [self.work.base_h, self.factor_check]
