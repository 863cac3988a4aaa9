"""The eager step: every chain in place (:mod:`lightning_gsgd.step.chain_step`), the BN-heuristic
layers and the parameters outside chains (torch's SGD rule), with one finiteness decision for all.

A step whose gradients, per-row sums or O(H) factors are not finite is skipped as a whole. On the
CPU, where reading a flag is free, that is decided before anything is written; elsewhere the step
is computed on copies and applied with ``torch.where`` on the device-side flag, so the step never
synchronizes with the device (docs/math.md, "Skipped steps and the guard").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_gsgd.step.chain_step import apply_chain, prepare_chain
from lightning_gsgd.step.inputs import StepArgs
from lightning_gsgd.step.normalized import normalized_items
from lightning_gsgd.step.passes import bulk
from lightning_gsgd.step.plan import hidden_biases
from lightning_gsgd.step.readings import collect_readings, update_after
from lightning_gsgd.step.readings import supported as readings_supported
from lightning_gsgd.step.single import all_finite, bn_heuristic_layer_step, keep, minmax, plain_sgd_step, write
from lightning_gsgd.step.slots import ChainReading, Prepared, Slot
from lightning_gsgd.topology.types import Chain


def eager_step(args: StepArgs) -> dict[int, ChainReading] | None:
    """One step of every tensor with a gradient, in place.

    Args:
        args: The step's arguments (:func:`lightning_gsgd.step.inputs.collect_step_args`).

    Returns:
        With ``args.readings``, the diagnostics readings per chain index of every chain stepped (a
        skipped step's readings hold no update); else ``None``.
    """
    device, want, state = args.device, args.readings, args.state
    prepared: list[Prepared] = []
    inputs: list[Tensor] = []  # the gradients checked directly (a NaN loss reaches every gradient)
    factors: list[Tensor] = []  # the per-row sums and the O(H) factors
    chain_of: list[int] = []
    for ci, chain in enumerate(args.chains):
        prep = _prepare(args, ci, chain)
        if prep is not None:
            prepared.append(prep)
            chain_of.append(ci)
            inputs.extend(prep.input_checks())
            factors.extend(prep.factor_check_values())
    inputs.extend(minmax(p.grad) for p, _ in args.plain)
    inputs.extend(minmax(layer.weight.grad) for layer in args.bn_layers)
    alone, alone_grads, alone_norms = normalized_items(args.normalized, args.hp_of, state)
    inputs.extend(alone_grads)
    factors.extend(alone_norms)
    inputs_ok = all_finite(inputs, device)
    ok = inputs_ok & all_finite(factors, device)
    skipped = args.counters.get("skipped_steps", device)
    collapsed = args.counters.get("collapsed_steps", device)  # skipped with finite gradients: a collapse
    if args.host_reads and not bool(ok):
        skipped += 1
        collapsed += inputs_ok.long()
        return collect_readings(prepared, chain_of, None, None) if want else None
    where_ok = None if args.host_reads else ok
    hits = args.counters.get("guard_hits", device)
    updates: list[Tensor] = []
    for prep in prepared:
        slots = prep.slots()
        _aim(slots, where_ok)
        chain_hits = apply_chain(prep)
        hits += chain_hits if where_ok is None else chain_hits * where_ok
        if want:
            updates.append(update_after(prep))
        _land(slots, state, where_ok)
    if alone:  # the S2 layers outside chains: the chain step's passes with s = |w_k| per row
        slots = [it.slot for it in alone]
        _aim(slots, where_ok)
        bulk(alone)
        _land(slots, state, where_ok)
    for layer in args.bn_layers:
        bn_heuristic_layer_step(layer, args.hp_of[id(layer.weight)][0], state, where_ok)
    for p, hp in args.plain:
        plain_sgd_step(p, hp, state, where_ok)
    args.counters.get("steps", device).add_(1 if where_ok is None else where_ok.long())
    if where_ok is not None:
        skipped += (~where_ok).long()
        collapsed += (inputs_ok & ~where_ok).long()
    return collect_readings(prepared, chain_of, updates, where_ok) if want else None


def _aim(slots: list[Slot], where_ok: Tensor | None) -> None:
    """Point the slots' targets at the parameters and buffers, or at copies when the step may not be taken."""
    for s in slots:
        if where_ok is not None:
            s.target = s.param.clone()
            s.buf_target = None if s.buf is None else s.buf.clone()
        else:
            s.buf_target = s.buf


def _land(slots: list[Slot], state: Any, where_ok: Tensor | None) -> None:
    """Write the copies back where the step is taken, and store the buffers in the optimizer's state."""
    for s in slots:
        if where_ok is not None:
            write(s.param, s.target, where_ok)
        if s.buf_target is not None:
            state[s.owner]["momentum_buffer"] = keep(s.buf_target, s.buf, where_ok)


def _prepare(args: StepArgs, ci: int, chain: Chain) -> Prepared | None:
    """Slots of a chain and phase one of its step; ``None`` when no layer has a gradient."""
    layers = chain.layers
    if all(layer.weight.grad is None for layer in layers):
        return None
    state, hp_of = args.state, args.hp_of
    weights: list[Slot] = []
    biases: list[Slot | None] = []
    for layer in layers:
        w = layer.weight
        grad = w.grad if w.grad is not None else torch.zeros_like(w)
        st = state.get(w)
        buf = None if st is None else st.get("momentum_buffer")
        w3 = layer.weight3d()
        if buf is not None and buf.shape != w3.shape:
            buf = buf.view_as(w3)
        weights.append(Slot(w3, layer.weight3d(grad), hp_of[id(w)][0], buf, w3, owner=w))
    for b in hidden_biases(chain):  # the layers' hidden biases, then the tied parameters
        if b is None or b.grad is None:
            biases.append(None)
            continue
        st = state.get(b)
        bbuf = None if st is None else st.get("momentum_buffer")
        biases.append(Slot(b, b.grad, hp_of[id(b)][0], bbuf, b, owner=b))
    min_ratio = hp_of[id(layers[0].weight)][1]["min_ratio"]
    work = args.caches.chain_work(ci, chain)
    bias_params = None
    hypers = [s.hp for s in [*weights, *biases] if s is not None]
    if args.readings and readings_supported(hypers, work.dtype):
        bias_params = [None if layer.bias is None else layer.bias.detach() for layer in layers]
    unit_b = None if args.host_reads else False
    return prepare_chain(work, weights, biases, min_ratio, unit_b=unit_b, bias_params=bias_params)
