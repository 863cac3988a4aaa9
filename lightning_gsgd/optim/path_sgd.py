"""``PathSGD``: Path-SGD (Neyshabur, Salakhutdinov, Srebro, NeurIPS 2015) on the ReLU chains of a topology.

Path-SGD is steepest descent with respect to the (squared) path norm
``phi(w) = sum over paths p of prod_{e in p} w_e**2``. Its update divides every gradient entry by
``gamma_e(w) = d phi / d(w_e**2)``, the sum over all paths through edge ``e`` of the product of the
squared *other* weights on the path::

    w_e <- w_e - lr * (dL/dw_e) / gamma_e(w),      gamma_e(w) = gamma_in(u) * gamma_out(v)  for e = (u -> v)

``gamma_in(u)`` (sum over paths from the inputs to ``u`` of the product of squared weights) comes from
one forward pass of the chain with squared weights on an all-ones input, and ``gamma_out(v)`` (sum over
paths from ``v`` to the outputs) from one backward pass. Here both passes are one matrix-vector
product per layer. Like G-SGD, the update is equivariant under positive rescaling of hidden units:
training from ``g_c(w)`` gives ``g_c`` of the run from ``w``, so the function is the same.

Choices this library makes (each keeps that equivariance exactly):

* **Chains as graphs.** Each chain of the :class:`~lightning_gsgd.Topology` is treated as a network
  of its own: ``gamma_in = 1`` on the chain's input nodes and ``gamma_out = 1`` on its output nodes.
* **Convolutions: per-node graph, taps summed.** Nodes are channels (as everywhere in this
  library) and the ``taps`` weights ``W[b, a, :]`` between channel ``a`` and channel ``b`` (kernel taps
  of a conv, spatial positions of a Linear after Flatten) are parallel edges, so
  ``gamma_in(b) = sum_{a, t} W[b, a, t]**2 gamma_in(a)`` and ``gamma`` of entry ``W[b, a, t]`` is
  ``gamma_in(a) * gamma_out(b)``, independent of the input size. This is *exactly* the derivative of the
  unrolled (weight-shared) network's path norm w.r.t. each shared weight's square when the convs use
  circular padding with stride 1 and no pooling (then every spatial position of a channel has the
  same ``gamma_in``, and summing ``gamma_out`` over positions obeys the per-node recursion; a test
  checks this with autograd). Zero padding, strides and pooling only change boundary and per-layer
  multiplicities in the unrolled view, which this choice ignores.
* **Hidden biases** are edges from a constant node that is never rescaled (``gamma_in = 1``, the
  all-ones input): ``gamma_in(b)`` gains ``bias_b**2`` and the bias is updated with ``gamma = gamma_out(b)``.
  Under ``g_c`` a bias scales with its node, exactly like an incoming edge from an input node, so
  this is the path norm of the network in which every bias is such an edge. An output bias then
  has ``gamma = 1``: it gets plain SGD, as in G-SGD.
* **Weight decay** ``lambda`` adds ``(lambda / 2) * phi(w)`` to the loss (the path regularizer of the
  Path-SGD paper, not an L2 penalty on weights), preconditioned like the loss: its gradient is
  ``lambda * w_e * gamma_e``, so the direction is ``d_e = g_e / gamma_e + lambda * w_e``.
* **Momentum** (with ``dampening`` and ``nesterov``, exactly as ``torch.optim.SGD``) acts on ``d`` in
  weight coordinates: ``buf = momentum * buf + (1 - dampening) * d``; ``w <- w - lr * buf`` (or
  ``d + momentum * buf`` with Nesterov). ``d`` transforms like ``w`` under ``g_c``, so this stays
  equivariant. The Path-SGD paper itself has neither momentum nor weight decay.
* ``gamma_in`` and ``gamma_out`` are each clamped below at ``eps`` (not shifted by it), so the update is
  exact wherever both are ``>= eps``. A zero only occurs at a node with no non-zero incoming (or
  outgoing) weight and bias, whose edges have a zero gradient anyway and then do not move.
* Parameters outside every chain get ``torch.optim.SGD``'s update with the same hyper-parameters
  (L2 weight decay on the weights). Non-finite gradients are applied as ``torch.optim.SGD`` would
  (no skipping).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_gsgd.optim.common import begin_step, check_chain_params, check_hyper
from lightning_gsgd.step.hyper import Hyper, hyper
from lightning_gsgd.step.single import sgd_update_
from lightning_gsgd.topology.types import Chain, ChainLayer, Topology, TopologyError

# ---------------------------------------------------------------------------------------------------
# Functional core: tensors in, no optimizer state (``path_gammas`` and ``path_scales`` are pure;
# ``path_sgd_chain_`` updates parameters in place like ``torch.optim.sgd.sgd``).


def path_gammas(weights: list[Tensor], biases: list[Tensor | None]) -> tuple[list[Tensor], list[Tensor]]:
    """``gamma_in`` of every layer's input nodes and ``gamma_out`` of every layer's output nodes.

    Args:
        weights: The chain's weights as ``[n_out, n_in, taps]`` views, input to output.
        biases: Bias per layer (or ``None``); hidden biases count as edges from a constant node.

    Returns:
        ``(gamma_in, gamma_out)``: ``gamma_in[l]`` (``[n_in]`` of layer ``l``, ones for the first
        layer) and ``gamma_out[l]`` (``[n_out]`` of layer ``l``, ones for the last layer).
    """
    # [n_out, n_in]: parallel edges (taps) summed
    sq = [w.square().squeeze(-1) if w.shape[-1] == 1 else w.square().sum(-1) for w in weights]
    w0 = weights[0]
    gin = [torch.ones(w0.shape[1], dtype=w0.dtype, device=w0.device)]
    for l in range(len(weights) - 1):
        g = torch.mv(sq[l], gin[l])
        b = biases[l]
        if b is not None:
            g = g + b.detach().square()
        gin.append(g)
    wl = weights[-1]
    gout = [torch.ones(wl.shape[0], dtype=wl.dtype, device=wl.device)]
    for l in range(len(weights) - 1, 0, -1):
        gout.insert(0, torch.mv(sq[l].t(), gout[0]))
    return gin, gout


def path_scales(weights: list[Tensor], biases: list[Tensor | None]) -> tuple[list[Tensor], list[Tensor | None]]:
    """Path-SGD's ``gamma`` for every weight entry (``[n_out, n_in, taps]``) and every bias (``[n_out]``).

    Not clamped (:func:`path_sgd_chain_` clamps ``gamma_in`` and ``gamma_out`` at ``eps``). Meant for
    tests and diagnostics.
    """
    gin, gout = path_gammas(weights, biases)
    gw = [(gout[l].view(-1, 1, 1) * gin[l].view(1, -1, 1)).expand_as(w) for l, w in enumerate(weights)]
    gb: list[Tensor | None] = [None if b is None else gout[l] for l, b in enumerate(biases)]
    return gw, gb


def path_sgd_chain_(
    weights: list[Tensor],
    grads: list[Tensor | None],
    biases: list[Tensor | None],
    bias_grads: list[Tensor | None],
    weight_bufs: list[Tensor | None],
    bias_bufs: list[Tensor | None],
    weight_hp: list[Hyper],
    bias_hp: list[Hyper | None],
    eps: float,
) -> tuple[list[Tensor | None], list[Tensor | None]]:
    """One Path-SGD step on a chain, **in place**, like the functional form of ``torch.optim.SGD``.

    ``gamma`` is computed from all the weights before any of them is written. Weights, biases and
    existing momentum buffers are updated in place (on a CPU, full-size temporaries cost more than the
    arithmetic: a version returning new tensors was several times slower); new buffers are returned.
    Entries without a gradient are left untouched, but their weights still enter ``gamma``.

    Args:
        weights: ``[n_out, n_in, taps]`` views of the weight parameters, input to output.
        grads: Matching gradient views (``None`` where there is no gradient).
        biases: Bias parameter per layer (or ``None``).
        bias_grads: Bias gradients (``None`` where there is no bias or no gradient).
        weight_bufs: Momentum buffers as ``[n_out, n_in, taps]`` views (``None`` before the first step).
        bias_bufs: Same for the biases.
        weight_hp: Hyper-parameters of each layer's weight.
        bias_hp: Hyper-parameters of each layer's bias (``None`` where there is no bias).
        eps: Lower clamp of ``gamma_in`` and ``gamma_out``.

    Returns:
        ``(weight_bufs, bias_bufs)``: the momentum buffers after the step (``None`` without momentum
        or without a gradient).
    """
    gin, gout = path_gammas(weights, biases)
    L = len(weights)
    wbufs: list[Tensor | None] = list(weight_bufs)
    bbufs: list[Tensor | None] = list(bias_bufs)
    for l in range(L):
        w, g = weights[l], grads[l]
        r_out = gout[l].clamp_min(eps).reciprocal()
        if g is not None:
            # g / (gamma_out(b) * gamma_in(a)) as two broadcast products, without a full-size gamma tensor
            d = (g * r_out.view(-1, 1, 1)).mul_(gin[l].clamp_min(eps).reciprocal().view(1, -1, 1))
            wbufs[l] = sgd_update_(w, d, wbufs[l], weight_hp[l], scratch=True)
        b, gb, bhp = biases[l], bias_grads[l], bias_hp[l]
        if b is not None and gb is not None:
            assert bhp is not None
            bbufs[l] = sgd_update_(b, gb * r_out, bbufs[l], bhp, scratch=True)
    return wbufs, bbufs


# ---------------------------------------------------------------------------------------------------
# The optimizer.


class PathSGD(Optimizer):
    """Path-SGD (Neyshabur et al. 2015): SGD preconditioned by the path norm of each ReLU chain.

    Every weight entry and hidden bias of a chain of ``topology`` is updated with its gradient divided
    by ``gamma`` (the sum over the paths through it of the product of the squared other weights);
    every other parameter gets ``torch.optim.SGD``'s update. The module docstring states exactly how
    convolutions, biases, momentum and weight decay are handled. Like :class:`~lightning_gsgd.GSGD`,
    the update is equivariant under positive rescaling of hidden units; unlike G-SGD it keeps no
    skeleton and needs no skeleton initialization.

    Per-group hyper-parameters apply per parameter, so LR schedulers work as usual; ``eps`` is read
    from the group of each chain's first weight.

    Args:
        params: Parameters or parameter groups, as for any torch optimizer.
        lr: Learning rate.
        momentum: Momentum factor (buffer in weight coordinates, on the preconditioned direction).
        dampening: Dampening for momentum.
        weight_decay: Coefficient ``lambda`` of the path regularizer ``(lambda / 2) * phi(w)`` on chain
            parameters (direction ``g / gamma + lambda * w``); plain L2 on parameters outside chains.
        nesterov: Use Nesterov momentum.
        topology: The model's topology from :func:`lightning_gsgd.detect_topology`. May be left out
            and supplied later with :meth:`bind`.
        eps: Lower clamp of ``gamma_in`` and ``gamma_out`` (must be positive).

    Example:
        >>> topo = detect_topology(model, example_input)  # doctest: +SKIP
        >>> opt = PathSGD(model.parameters(), lr=0.01, topology=topo)  # doctest: +SKIP
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        topology: Topology | None = None,
        eps: float = 1e-12,
    ) -> None:
        check_hyper(
            {
                "lr": lr,
                "momentum": momentum,
                "dampening": dampening,
                "weight_decay": weight_decay,
                "nesterov": nesterov,
            },
            "PathSGD",
        )
        if not eps > 0.0:
            raise ValueError(f"PathSGD: invalid eps={eps}; it must be > 0")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "eps": eps,
        }
        super().__init__(params, defaults)
        self.topology: Topology | None = None
        if topology is not None:
            self.bind(topology)

    def bind(self, topology: Topology) -> PathSGD:
        """Attach the model's topology; every chain parameter must be in this optimizer.

        Args:
            topology: From :func:`lightning_gsgd.detect_topology` on the model being optimized.

        Returns:
            ``self``, for chaining.

        Raises:
            TopologyError: A chain parameter is not in this optimizer's parameter groups or is frozen.
        """
        check_chain_params(topology, self.param_groups, "PathSGD")
        dags = [chain.name for chain in topology.chains if not chain.is_sequence]
        if dags:
            raise TopologyError(
                f"PathSGD: {len(dags)} chain(s) with fan-out or concatenation ({', '.join(dags[:3])}); PathSGD "
                "handles sequence chains only: use GSGD, or detect_topology(..., exclude=[...]) on those layers"
            )
        bn = topology.bn_segment_names()
        if bn:
            raise TopologyError(
                f"PathSGD: {len(bn)} BatchNorm segment(s) ({', '.join(bn[:3])}); PathSGD has no exact BatchNorm "
                "rule: use GSGD, or detect_topology(..., bn_mode='sgd')"
            )
        self.topology = topology
        return self

    @property
    def is_bound(self) -> bool:
        """Whether a topology is attached."""
        return self.topology is not None

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one Path-SGD step.

        Args:
            closure: Re-evaluates the model and returns the loss (run under ``torch.enable_grad``).

        Returns:
            The closure's loss, or ``None``.

        Raises:
            RuntimeError: The optimizer has no topology (see :meth:`bind`).
        """
        loss = begin_step(
            closure,
            self.topology,
            "PathSGD is not bound to a model: pass topology=detect_topology(model, example_input) "
            "to PathSGD(...) or call optimizer.bind(topology)",
        )
        assert self.topology is not None
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        in_chain = {id(p) for p in self.topology.chain_params()}
        for chain in self.topology.chains:
            self._chain_step(chain, group_of)
        for group in self.param_groups:
            hp = hyper(group)
            for p in group["params"]:
                if p.grad is None or id(p) in in_chain:
                    continue
                buf = sgd_update_(p, p.grad, self.state[p].get("momentum_buffer"), hp, scratch=False)
                if buf is not None:
                    self.state[p]["momentum_buffer"] = buf
        return loss

    def _chain_step(self, chain: Chain, group_of: dict[int, dict[str, Any]]) -> None:
        layers = chain.layers
        biases = [layer.bias for layer in layers]
        wbufs, bbufs = path_sgd_chain_(
            weights=[layer.weight3d() for layer in layers],
            grads=[None if layer.weight.grad is None else layer.weight3d(layer.weight.grad) for layer in layers],
            biases=biases,
            bias_grads=[None if b is None else b.grad for b in biases],
            weight_bufs=[_view3d(layer, self.state[layer.weight].get("momentum_buffer")) for layer in layers],
            bias_bufs=[None if b is None else self.state[b].get("momentum_buffer") for b in biases],
            weight_hp=[hyper(group_of[id(layer.weight)]) for layer in layers],
            bias_hp=[None if b is None else hyper(group_of[id(b)]) for b in biases],
            eps=group_of[id(layers[0].weight)]["eps"],
        )
        for layer, wbuf, bias, bbuf in zip(layers, wbufs, biases, bbufs):
            if wbuf is not None:
                self.state[layer.weight]["momentum_buffer"] = wbuf.view_as(layer.weight)
            if bias is not None and bbuf is not None:
                self.state[bias]["momentum_buffer"] = bbuf


def _view3d(layer: ChainLayer, buf: Tensor | None) -> Tensor | None:
    return None if buf is None else layer.weight3d(buf)
