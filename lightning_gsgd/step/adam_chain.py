"""One chain's G-space Adam step (docs/math.md, "Adam in path space"): phase one
(:func:`prepare_adam_chain`: B, F, Gamma, the tau entries' Adam step and guard, rho, the checks; writes
nothing) and phase two (:func:`apply_adam_chain`: the elementwise passes, then the tau and sigma
entries written back). See :mod:`lightning_gsgd.step.adam` for the formulas.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_gsgd.step.adam_plan import AdamChainPlan
from lightning_gsgd.step.adam_rule import (
    AdamHyper,
    Tick,
    add_step,
    decay_factor,
    ensure_state,
    moments_denom,
    store_state,
    tick,
)
from lightning_gsgd.step.single import minmax, write
from lightning_gsgd.topology.index import columns, normalized_row_norms


@dataclass
class AdamSlot:
    """One chain tensor (a weight as an ``[n_out, n_in, taps]`` view, or a hidden bias) and its step."""

    param: Tensor
    owner: Tensor
    grad: Tensor | None
    hp: AdamHyper
    tick: Tick | None = None


@dataclass
class PreparedAdam:
    """A chain after phase one: everything O(H) is computed, nothing is written.

    Attributes:
        plan: The chain's index plan.
        weights: Per layer, the weight slot.
        biases: Per layer, the hidden bias slot (``None``: no bias, or the output layer); then one
            per tied parameter, in the order of ``AdamChainPlan.tied_layer``.
        s: Per layer, ``1 / (B F)`` as ``[n_out, n_in, 1]`` (``[n_out, 1, 1]`` when every ``B`` is 1).
        s_bias: Per layer, ``1 / F`` of its output nodes.
        rhoinv: Per layer, ``1 / rho`` of its output nodes (``None`` on the output layer).
        tau_new: Per layer after the first, the new tau entries: weight, exp_avg, exp_avg_sq, max.
        sig_w: Per hidden layer, its sigma weights (kept).
        checks: Tensors that must be finite for the step to be taken.
        hits: Number of free tau path values the guard clamped (0-d int64).
    """

    plan: AdamChainPlan
    weights: list[AdamSlot]
    biases: list[AdamSlot | None]
    s: list[Tensor] = field(default_factory=list)
    s_bias: list[Tensor] = field(default_factory=list)
    rhoinv: list[Tensor | None] = field(default_factory=list)
    tau_new: list[tuple[Tensor, Tensor, Tensor, Tensor | None] | None] = field(default_factory=list)
    sig_w: list[Tensor | None] = field(default_factory=list)
    checks: list[Tensor] = field(default_factory=list)
    hits: Tensor | None = None


def _gathered(state: Any, owner: Tensor, key: str, idx: Tensor, like: Tensor) -> Tensor:
    """Entries ``idx`` of the state tensor ``key`` of ``owner`` (zeros when there is none yet)."""
    st = state.get(owner)
    t = None if st is None else st.get(key)
    return torch.zeros_like(like) if t is None else t.reshape(-1).take(idx)


def prepare_adam_chain(
    plan: AdamChainPlan,
    weights: list[AdamSlot],
    biases: list[AdamSlot | None],
    state: Any,
    min_ratio: float,
    *,
    host_reads: bool,
    row_sums: list[Tensor] | None = None,
    local_rows: list[tuple[int, int]] | None = None,
) -> PreparedAdam:
    """Phase one of a chain's step: B, F, Gamma, every tau entry's Adam step and guard, rho; no write.

    Args:
        plan: The chain's index plan.
        weights: Per layer, the weight slot (a gradient of zeros where the weight had none).
        biases: Per layer, the hidden bias slot or ``None``.
        state: The optimizer's state (read only here).
        min_ratio: Guard of free tau path values.
        host_reads: Whether values may be read on the host (CPU): the step counters are then numbers,
            and a ``B`` of ones is detected to keep ``1 / (B F)`` a row vector.
        row_sums: Sharded steps (:mod:`lightning_gsgd.step.adam_sharded`): per hidden layer (by layer
            index), the gathered ``sum(w g)`` of every row (bias term included); the weights are then
            the layers' skeleton entries only, and the biases ``None``.
        local_rows: Sharded steps: per layer, the rows ``[a, b)`` whose ``1 / (B F)`` to return in ``s``.
    """
    L = len(weights)
    prep = PreparedAdam(plan, weights, biases)
    ws = [s.param for s in weights]
    gs = [s.grad for s in weights]
    assert all(g is not None for g in gs)
    idx = plan.index
    for s in [*weights, *[b for b in biases if b is not None]]:
        st = state.get(s.owner)
        s.tick = tick(s.hp, None if st is None else st.get("step"), s.param, host_reads)
    for l, s in enumerate(weights):
        # a hidden layer's weight gradient is checked by its row sums sum(w g) below (0 * inf is NaN)
        if s.grad is not None and not idx[l].hidden:
            prep.checks.append(minmax(s.grad))
    for b in biases:
        if b is not None and b.grad is not None:
            prep.checks.append(minmax(b.grad))
    H = idx[0].n_hidden
    R = max(i.row_off + i.n_out for i in idx)
    dtype, device = ws[0].dtype, ws[0].device
    # B of every hidden node (then 1 for nodes outside the chain) and F of every row, from the
    # sigma / tau entries (docs/math.md, "The sigma/tau basis")
    b_nodes = torch.ones(H + 1, dtype=dtype, device=device)
    for l in range(L):
        sig = plan.sig_flat[l]
        if sig is not None:
            assert idx[l].sig_src is not None
            b_nodes[idx[l].rows] = ws[l].reshape(-1).take(sig) * b_nodes[idx[l].sig_src]
    f_rows = torch.ones(R, dtype=dtype, device=device)
    for l in range(L - 1, -1, -1):
        tau = plan.tau_flat[l]
        if tau is not None:
            assert idx[l].tau_rows is not None
            f_rows[idx[l].tau_nodes] = ws[l].reshape(-1).take(tau) * f_rows[idx[l].row_off + idx[l].tau_rows]
    B = [columns(b_nodes, i) for i in idx]
    if plan.normalized:
        # S2 (docs/math.md, "BatchNorm segments: S1 and S2"): G-Adam on the slice n = 1
        f_rows = f_rows / normalized_row_norms(ws, B, idx, plan.normalized).sqrt()
    F = [f_rows[i.rows] for i in idx]
    # Gamma of every hidden node (docs/math.md, "The inverse chain rule")
    gamma = torch.zeros(H + 1, dtype=dtype, device=device)
    for l in range(L):
        sig = plan.sig_flat[l]
        if sig is None:
            continue
        if row_sums is not None:
            row = row_sums[l]
        else:
            row = torch.linalg.vecdot(ws[l].flatten(1), gs[l].flatten(1))  # type: ignore[union-attr]
        for b in _row_inputs(biases, plan, l, L):
            if b is not None and b.grad is not None:
                row = row + b.param * b.grad
        gam = row - ws[l].reshape(-1).take(sig) * gs[l].reshape(-1).take(sig)  # type: ignore[union-attr]
        ist, src = idx[l].sig_is_tau, idx[l].sig_src
        assert ist is not None and src is not None
        gamma[idx[l].rows] = gam + torch.where(ist, gamma[src], 0.0)
    prep.checks += [b_nodes, f_rows, gamma]
    unit_b = host_reads and torch.equal(b_nodes, torch.ones_like(b_nodes))
    # tau entries: Adam on the Gamma-corrected path gradient, then the guard
    ratio_of: list[Tensor | None] = [None] * L
    prep.tau_new = [None] * L
    hits = torch.zeros((), dtype=torch.int64, device=device)
    for l in range(L):
        tau = plan.tau_flat[l]
        if tau is None:
            continue
        rows, nodes, free = idx[l].tau_rows, idx[l].tau_nodes, idx[l].tau_free
        assert rows is not None and nodes is not None and free is not None
        slot = weights[l]
        hp, t = slot.hp, slot.tick
        assert t is not None
        w_tau = ws[l].reshape(-1).take(tau)
        g_tau = gs[l].reshape(-1).take(tau)  # type: ignore[union-attr]
        v = w_tau * b_nodes[nodes] * f_rows[idx[l].row_off + rows]
        d = torch.addcmul(gamma[nodes], g_tau, w_tau, value=-1).div_(v).neg_()
        if hp.weight_decay != 0 and not hp.decoupled:
            d.add_(v, alpha=hp.weight_decay)
        m = _gathered(state, slot.owner, "exp_avg", tau, w_tau)
        q = _gathered(state, slot.owner, "exp_avg_sq", tau, w_tau)
        qmax = _gathered(state, slot.owner, "max_exp_avg_sq", tau, w_tau) if hp.amsgrad else None
        denom = moments_denom(m, q, qmax, d, hp, t)
        v_new = v * decay_factor(hp, t) if hp.weight_decay != 0 and hp.decoupled else v.clone()
        add_step(v_new, m.clone(), denom, t)
        ratio = v_new / v
        hit = torch.ge(ratio, min_ratio).logical_not_().logical_and_(free)
        ratio.masked_fill_(hit, min_ratio)
        # a non-free tau entry is a sigma entry, no coordinate: it does not move (ratio 1)
        ratio = torch.where(free, ratio, 1.0)
        hits = hits + hit.sum()
        ratio_of[l] = ratio
        prep.tau_new[l] = (w_tau, m, q, qmax)  # the weight entries are finished below, with rho
        prep.checks += [m, q, ratio] + ([] if qmax is None else [qmax])
    prep.hits = hits
    # rho = F'/F of every row: the ratio of the first free tau edge downstream (1 on output rows)
    rho_rows = torch.ones(R, dtype=dtype, device=device)
    for l in range(L - 1, -1, -1):
        ratio = ratio_of[l]
        if ratio is None:
            continue
        i = idx[l]
        assert i.tau_free is not None and i.tau_rows is not None
        rho_rows[i.tau_nodes] = torch.where(i.tau_free, ratio, rho_rows[i.row_off + i.tau_rows])
    prep.rhoinv = [rho_rows[i.rows].reciprocal() if i.hidden else None for i in idx]
    for l in range(L):
        entry = prep.tau_new[l]
        ratio = ratio_of[l]
        if entry is None:
            continue
        assert ratio is not None and idx[l].tau_rows is not None
        w_tau, m, q, qmax = entry
        w_new = w_tau * ratio / rho_rows[idx[l].row_off + idx[l].tau_rows]
        prep.tau_new[l] = (w_new, m, q, qmax)
        prep.checks.append(w_new)
    # per-layer factors: s = 1 / (B F), 1 / F of the biases; the floor 1 / F'^2 of the next step
    for l in range(L):
        r = F[l].reciprocal()
        prep.s_bias.append(r)
        lo, hi = (0, r.numel()) if local_rows is None else local_rows[l]
        if unit_b or not idx[l].reads_hidden:
            prep.s.append(r[lo:hi].view(-1, 1, 1))
        else:
            prep.s.append(torch.outer(r[lo:hi], B[l].reciprocal()).unsqueeze(-1))
        prep.checks += [r, B[l].reciprocal()]
        rinv = prep.rhoinv[l]
        if rinv is not None:
            prep.checks += [rinv, (r * rinv).square()]
    prep.sig_w = [None if plan.sig_flat[l] is None else ws[l].reshape(-1).take(plan.sig_flat[l]) for l in range(L)]
    return prep


def adam_chain_checks(prep: PreparedAdam) -> Tensor:
    """Every value phase one checks, as one 1-D tensor (finite exactly when the step may be taken)."""
    return torch.cat([c.reshape(-1) for c in prep.checks])


def apply_adam_chain(prep: PreparedAdam, state: Any, host_reads: bool, ok: Tensor | None) -> Tensor:
    """Phase two: write the chain's step (in place, or where ``ok`` holds when ``ok`` is given).

    Returns:
        0-d int64 tensor: the number of free tau path values the guard clamped.
    """
    plan = prep.plan
    L = len(prep.weights)
    for l, slot in enumerate(prep.weights):
        apply_adam_tensor(
            slot,
            prep.s[l],
            prep.rhoinv[l],
            state,
            host_reads,
            ok,
            tau=None if plan.tau_flat[l] is None else (plan.tau_flat[l], prep.tau_new[l]),
            sig=None if plan.sig_flat[l] is None else (plan.sig_flat[l], prep.sig_w[l]),
        )
        if not plan.index[l].hidden:
            continue
        for b in _row_inputs(prep.biases, plan, l, L):
            if b is None:
                continue
            rinv = prep.rhoinv[l]
            assert rinv is not None
            if b.grad is None:  # no gradient: keep its path value, follow the row's rescale
                write(b.param, b.param * rinv, ok)
            else:
                apply_adam_tensor(b, prep.s_bias[l], rinv, state, host_reads, ok, tau=None, sig=None)
    assert prep.hits is not None
    return prep.hits


def _row_inputs(biases: list[AdamSlot | None], plan: AdamChainPlan, l: int, L: int) -> list[AdamSlot | None]:
    """Layer ``l``'s hidden bias slot, then its tied parameters' (``biases`` holds the ``L`` layers'
    bias slots, then one per ``plan.tied_layer``)."""
    return [biases[l]] + [t for k, t in zip(plan.tied_layer, biases[L:]) if k == l]


def apply_adam_tensor(
    slot: AdamSlot,
    s: Tensor,
    rhoinv: Tensor | None,
    state: Any,
    host_reads: bool,
    ok: Tensor | None,
    *,
    tau: tuple[Tensor, Any] | None,
    sig: tuple[Tensor, Any] | None,
) -> None:
    """The elementwise step of one chain tensor, then its tau entries (new) and sigma entries (kept)."""
    p, hp, t = slot.param, slot.hp, slot.tick
    assert slot.grad is not None and t is not None
    st = state[slot.owner]
    ensure_state(st, slot.owner, hp, host_reads)
    shape = p.shape
    m, q = st["exp_avg"].view(shape), st["exp_avg_sq"].view(shape)
    qmax = st["max_exp_avg_sq"].view(shape) if hp.amsgrad else None
    target = p
    if ok is not None:
        target, m, q = p.clone(), m.clone(), q.clone()
        qmax = None if qmax is None else qmax.clone()
    if p.dim() == 1:
        s = s.view(-1)
        rinv = rhoinv
    else:
        rinv = None if rhoinv is None else rhoinv.view(-1, 1, 1)
    # Fewer passes than the textbook form: with bc = sqrt(1 - beta2^t) and ss = lr / (1 - beta1^t),
    # ss * s * m / (sqrt(q) / bc + eps) / rho = (ss bc) * m / ((sqrt(q) + eps bc) / (s / rho)).
    d = slot.grad * s
    scale_w: float | Tensor | None = rinv
    if hp.weight_decay != 0:
        if hp.decoupled:  # (1 - lr wd) w, folded into the row rescale
            decay = decay_factor(hp, t)
            scale_w = decay if rinv is None else rinv * decay
        else:
            d.addcdiv_(p, s, value=hp.weight_decay)  # wd v = wd w / s
    m.lerp_(d, 1 - hp.beta1)
    q.mul_(hp.beta2).addcmul_(d, d, value=1 - hp.beta2)
    src = q
    if qmax is not None:
        torch.maximum(qmax, q, out=qmax)
        src = qmax
    denom = torch.sqrt(src, out=d).add_(hp.eps * t.bc2_sqrt)
    denom.div_(s if rinv is None else s * rinv)
    if scale_w is not None:
        target.mul_(scale_w)
    step = t.step_size * t.bc2_sqrt
    if isinstance(step, Tensor) and isinstance(t.new, Tensor):  # no host read of a device value
        target.sub_(m.div(denom).mul_(step))
    else:
        target.addcdiv_(m, denom, value=-step)
    flat_t, flat_m, flat_q = target.view(-1), m.reshape(-1), q.reshape(-1)
    flat_x = None if qmax is None else qmax.reshape(-1)
    if tau is not None:
        pos, (w_new, m_new, q_new, x_new) = tau
        flat_t.index_copy_(0, pos, w_new)
        flat_m.index_copy_(0, pos, m_new)
        flat_q.index_copy_(0, pos, q_new)
        if flat_x is not None:
            flat_x.index_copy_(0, pos, x_new)
    if sig is not None:
        pos, w_sig = sig
        flat_t.index_copy_(0, pos, w_sig)
        flat_m.index_fill_(0, pos, 0)
        flat_q.index_fill_(0, pos, 0)
        if flat_x is not None:
            flat_x.index_fill_(0, pos, 0)
    store_state(
        st,
        t,
        m.view_as(st["exp_avg"]),
        q.view_as(st["exp_avg"]),
        None if qmax is None else qmax.view_as(st["exp_avg"]),
        ok,
    )
    if ok is not None:
        write(p, target, ok)
