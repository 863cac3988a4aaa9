"""Adam and AdamW on the basis-path values of ReLU chains (docs/math.md, "Adam in path space").

The free coordinates of a chain are the path values ``v = w B F`` of its non-sigma weight entries and
``bias F`` of its hidden biases; their gradient ``dL/dv`` is that of "The inverse chain rule" (free tau
entries carry the Gamma correction). Adam's moments are kept per parameter **in path coordinates**,
shaped like the parameter (sigma entries 0), with torch's state keys (``step``, ``exp_avg``,
``exp_avg_sq``, ``max_exp_avg_sq``). One step is, per coordinate,

* Adam: ``d = dL/dv + wd v``; AdamW: ``d = dL/dv`` and ``v <- (1 - lr wd) v`` first;
* torch's Adam rule on ``d`` (``exp_avg``, ``exp_avg_sq``, amsgrad, bias corrections from the
  tensor's own ``step``): ``v' = v - lr / bc1 * exp_avg / (sqrt(exp_avg_sq) / sqrt(bc2) + eps)``;
* the guard on free tau path values (``v'/v >= min_ratio``, else ``min_ratio v``);
* the map back with every sigma weight fixed, ``w' = (w + (v' - v) / (B F)) / rho``, where
  ``rho = F'/F`` per row is the guarded ratio ``v'/v`` of the first free tau edge on the row's tau
  chain (1 on the output layer), as in G-SGD.

With ``s = 1 / (B F)`` (an outer product; a row vector when every ``B`` is 1), the path gradient of an
entry that is neither sigma nor tau is ``s g``, and ``v * s = w``, so an entry's update is
``w' = ((1 - lr wd) w - lr / bc1 * s exp_avg / denom) / rho``: a few elementwise passes per tensor.
The O(H) sigma and tau entries are gathered, stepped apart (tau: Gamma correction and guard; sigma:
unchanged, moments 0) and written back after the elementwise passes.

Like the G-SGD step it has two phases: :func:`prepare_adam_chain` reads and computes every O(H)
quantity and the finiteness checks, writing nothing; :func:`apply_adam_chain` writes, in place (CPU,
after the decision) or on copies applied with ``torch.where`` (accelerators, no host read).
Parameters outside chains (and each chain's output bias) take torch's single-tensor Adam/AdamW rule
(:func:`plain_adam_step`), bit for bit on the CPU.

Loops run over layers, never over units. Imports only torch, the topology and other step modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_gsgd.step.adam_chain import (
    AdamSlot,
    PreparedAdam,
    adam_chain_checks,
    apply_adam_chain,
    prepare_adam_chain,
)
from lightning_gsgd.step.adam_plan import AdamPlans
from lightning_gsgd.step.adam_rule import AdamHyper, adam_hyper, plain_adam_step
from lightning_gsgd.step.inputs import StepCounters
from lightning_gsgd.step.normalized import adam_normalized_step
from lightning_gsgd.step.plan import hidden_biases
from lightning_gsgd.step.single import all_finite, minmax
from lightning_gsgd.topology.types import Chain, ChainLayer

__all__ = ["AdamHyper", "AdamPlans", "AdamStepArgs", "adam_hyper", "adam_step"]


@dataclass
class AdamStepArgs:
    """One step's arguments (collected by :class:`lightning_gsgd.optim.gadam.GAdam`)."""

    chains: tuple[Chain, ...]
    plans: AdamPlans
    hp_of: dict[int, tuple[AdamHyper, dict[str, Any]]]
    plain: list[tuple[Tensor, AdamHyper]]
    state: Any
    counters: StepCounters
    device: torch.device
    host_reads: bool
    normalized: list[ChainLayer] = field(default_factory=list)  # S2 layers outside chains


def adam_step(args: AdamStepArgs) -> None:
    """One G-Adam step of every tensor with a gradient, with one finiteness decision for all.

    On the host-read path (CPU) a step whose gradients or O(H) factors are not finite is refused before
    anything is written; otherwise the step is computed on copies and applied with ``torch.where``.
    """
    device, state, host_reads = args.device, args.state, args.host_reads
    prepared: list[PreparedAdam] = []
    inputs: list[Tensor] = []  # the gradients checked directly: a NaN or inf loss reaches each of them
    for ci, chain in enumerate(args.chains):
        layers = chain.layers
        if all(layer.weight.grad is None for layer in layers):
            continue
        weights = []
        for layer in layers:
            w = layer.weight
            grad = w.grad if w.grad is not None else torch.zeros_like(w)
            weights.append(AdamSlot(layer.weight3d(), w, layer.weight3d(grad), args.hp_of[id(w)][0]))
        # the layers' hidden biases, then the tied parameters (AdamChainPlan.tied_layer)
        biases = [None if b is None else AdamSlot(b, b, b.grad, args.hp_of[id(b)][0]) for b in hidden_biases(chain)]
        min_ratio = args.hp_of[id(layers[0].weight)][1]["min_ratio"]
        prep = prepare_adam_chain(args.plans.plan(ci, chain), weights, biases, state, min_ratio, host_reads=host_reads)
        prepared.append(prep)
        inputs += [minmax(x.weight.grad) for x, h in zip(layers, chain.hidden) if not h and x.weight.grad is not None]
    inputs += [minmax(p.grad) for p, _ in args.plain]
    alone_grads, alone_norms, apply_alone = adam_normalized_step(args.normalized, args.hp_of, state, host_reads)
    inputs += alone_grads
    checks = [adam_chain_checks(p) for p in prepared] + inputs + alone_norms
    skipped = args.counters.get("skipped_steps", device)
    collapsed = args.counters.get("collapsed_steps", device)  # skipped with finite gradients: a collapse
    ok: Tensor | None = None
    if checks:
        ok = all_finite(checks, device)
        inputs_ok = all_finite(inputs, device)
        if host_reads and not bool(ok):
            skipped += 1
            collapsed += inputs_ok.long()
            return
    where_ok = None if host_reads or ok is None else ok
    hits = args.counters.get("guard_hits", device)
    for prep in prepared:
        chain_hits = apply_adam_chain(prep, state, host_reads, where_ok)
        hits += chain_hits if where_ok is None else chain_hits * where_ok
    apply_alone(where_ok)
    for p, hp in args.plain:
        plain_adam_step(p, hp, state, host_reads, where_ok)
    args.counters.get("steps", device).add_(1 if where_ok is None else where_ok.long())
    if where_ok is not None:
        skipped += (~where_ok).long()
        collapsed += (inputs_ok & ~where_ok).long()
