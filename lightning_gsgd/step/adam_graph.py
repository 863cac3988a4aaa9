"""The whole G-Adam step of every chain as one ``torch.compile`` graph (``GAdam(compiled=True)``).

The same mathematics as the eager step (:mod:`lightning_gsgd.step.adam_chain`; docs/math.md, "Adam in
path space") written as plain tensor expressions over every chain, in the layout of G-SGD's graph
(:mod:`lightning_gsgd.step.graph`), from the same per-chain index data
(:class:`~lightning_gsgd.step.graph_chain.GraphChain`):

* phase one (:func:`_prepare`): the skeleton gathers (weights, gradients, both moments and the
  amsgrad maximum at the sigma and tau entries), the row sums ``sum(w * g)``, ``B``, ``F``, ``Gamma``,
  Adam on every tau entry's Gamma-corrected path gradient with the guard, ``rho``, the new tau
  weights, and the finiteness flag ``ok`` (the eager step's checks); per chain one small vector of
  per-row and per-entry values;
* phase two (:func:`_update`): one pass per tensor reading ``w``, ``g`` and the moments and writing
  them back where ``ok`` (``torch.where``: no host read on any device): ``d = s g (+ wd v)``, torch's
  moment update, ``w' = (decay w - step_size s m' / (sqrt(q') / bc2 + eps)) / rho``; sigma entries
  keep their weight and have moments 0, free tau entries take the values of phase one;
* the parameters outside chains (torch's Adam/AdamW rule), every tensor's ``step`` counter and the
  optimizer's counters are updated in the graph too.

Hyper-parameters enter as a float64 table with one row per chain tensor (weights, then hidden biases,
then tied parameters),
``[lr, wd (L2), wd (decoupled), beta1, beta2, eps, min_ratio]``; the bias corrections are computed in
the graph from each tensor's ``step`` tensor, so neither a scheduler nor the step count changes the graph.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_gsgd.step.auto_compile import use_cpp_wrapper
from lightning_gsgd.step.graph_chain import GraphChain, compile_step, math_dtype, normalized_f, piece, row_sums
from lightning_gsgd.step.normalized import row_scale

# Columns of the hyper-parameter table.
LR, WD, WD_DEC, BETA1, BETA2, EPS, MIN_RATIO = range(7)
N_HP = 7

#: One tensor of the step: ``(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq or None, step)``;
#: a hidden bias without gradient is ``(bias, None, None, None, None, None)`` (only rescaled).
Slot = tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None]


def _scalars(hp: Tensor, step: Tensor, dtype: torch.dtype) -> Tensor:
    """Per row of ``hp`` (``[n, N_HP]``) and its tensor's ``step`` (``[n]``, before this step):
    ``[step_size, bc2_sqrt, decay]`` columns in ``dtype`` (``lr / (1 - beta1^t)``, ``sqrt(1 - beta2^t)``,
    AdamW's ``1 - lr wd``), computed in float64 as torch's Adam computes them on the host."""
    t = (step + 1).to(hp.dtype)
    step_size = hp[:, LR] / (1 - torch.pow(hp[:, BETA1], t))
    bc2 = torch.sqrt(1 - torch.pow(hp[:, BETA2], t))
    decay = 1 - hp[:, LR] * hp[:, WD_DEC]
    return torch.stack([step_size, bc2, decay], 1).to(dtype)


def _adam(
    m: Tensor, q: Tensor, x: Tensor | None, d: Tensor, hp: Tensor, sc: Tensor
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """torch's moment update with direction ``d``: ``(m', q', max', m' / denom)``; ``hp`` and ``sc`` are
    one row (or per-entry rows broadcast against ``d``) of the table and of :func:`_scalars`."""
    m1 = torch.lerp(m.to(d.dtype), d, (1 - hp[..., BETA1]).to(d.dtype))  # (bfloat16 moments, float32 d)
    q1 = hp[..., BETA2] * q + (1 - hp[..., BETA2]) * (d * d)
    src = q1
    x1 = None
    if x is not None:
        x1 = torch.maximum(x, q1)
        src = x1
    return m1, q1, x1, m1 / (torch.sqrt(src) / sc[..., 1] + hp[..., EPS])


def _prepare(
    chains: list[GraphChain],
    ws: list[list[Slot]],
    bs: list[list[Slot | None]],
    hps: list[Tensor],
    extra: list[Tensor],
    extra_factors: list[Tensor],
) -> tuple[Tensor, Tensor, Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    """Phase one over every chain: ``(ok, inputs_ok, hits, vecs, scs, stored)``.

    ``ws[c][l]`` is layer ``l``'s weight slot, ``bs[c][l]`` its hidden bias slot (``None``: no bias, and
    always on output layers), ``hps[c]`` the ``[2L, N_HP]`` table; ``extra`` the gradients of the
    parameters outside chains. ``vecs[c]`` is ``[F, 1 / F, 1 / rho]`` over the chain's rows, then per entry
    ``k`` of the layers after the first, of its input node: ``B``, ``1 / B``, the new tau weight, exp_avg,
    exp_avg_sq (and max_exp_avg_sq when the tau layer has one). ``scs[c]`` is the chain's
    :func:`_scalars` table (rows of biases without gradient are unused). ``stored`` is what the graph
    returns besides ``vecs`` for Inductor to store it once (as in :mod:`lightning_gsgd.step.graph`).
    """
    dtype = ws[0][0][0].dtype
    inputs = [torch.stack(torch.aminmax(g)).reshape(2).to(dtype) for g in extra]
    checks: list[Tensor] = [f.reshape(-1).to(dtype) for f in extra_factors]
    hits = []
    vecs = []
    scs = []
    stored: list[Tensor] = []
    for c, ch in enumerate(chains):
        L, H = ch.n_layers, ch.hidden
        sel = [piece(ch.ints, spec) for spec in ch.ispec[:L]]
        walk_bf, walk_g_rows, tau_take, sig_take, free, first_free, nxt, _fp, _fn, tau_layer, col_node = (
            piece(ch.ints, spec) for spec in ch.ispec[L:-1]
        )
        w2 = [s[0].view(shape) for s, shape in zip(ws[c], ch.shape2)]
        g2 = [s[1].view(shape) for s, shape in zip(ws[c], ch.shape2)]  # type: ignore[union-attr]
        hp = hps[c]
        md = math_dtype(w2[0].dtype)
        steps = [s[5] for s in ws[c]] + [w2[0].new_zeros(()) if b is None or b[5] is None else b[5] for b in bs[c]]
        sc = _scalars(hp, torch.stack([t.to(hp.dtype) for t in steps]), md)
        scs.append(sc)
        hpm = hp.to(md)
        one = w2[0].new_ones(1)
        sw = torch.cat([w.reshape(-1)[s] for w, s in zip(w2, sel)])
        sg = torch.cat([g.reshape(-1)[s] for g, s in zip(g2, sel)])
        skel = torch.cat([sw, one, sg])
        mom = [torch.cat([slot[k].reshape(-1)[s] for slot, s in zip(ws[c], sel)]) for k in (2, 3)]  # type: ignore[union-attr]
        rows = []
        for l in range(L):
            if not ch.is_hidden[l]:
                continue
            r = row_sums(w2[l] * g2[l])
            for t, _ in ch.row_inputs(l):  # the hidden bias, the tied parameters
                b = bs[c][t]
                if b is not None and b[1] is not None:
                    r = r + b[0] * b[1]
                    checks.append(torch.stack(torch.aminmax(b[1])))
            rows.append(r)
        n_last = ch.n_rows - H  # the output layers' rows
        w_sig, g_sig = skel[sig_take].unbind(0)
        base_h = torch.cat(rows) - w_sig * g_sig
        base = torch.cat([base_h, sw.new_zeros(n_last + 1)])
        bf = skel[walk_bf].prod(1)
        B, F = bf[:H], bf[H + 1 :]
        ones_last = sw.new_ones(n_last)
        F_last = ones_last
        if ch.normalized:
            F, F_last, b_ent = normalized_f(ch, w2, B, F, one, col_node, piece(ch.ints, ch.ispec[-1]))
            stored.append(b_ent)
        gamma = base[walk_g_rows].sum(1)
        tab, tsc = hpm[tau_layer], sc[tau_layer]  # a node's tau edge lies in layer tau_layer
        w_tau, g_tau = skel[tau_take[:2]].unbind(0)
        pos = tau_take[0]  # the tau entry's skeleton position (a sigma position where it is not free)
        v = B * F
        d = (g_tau * w_tau - gamma) / v + tab[:, WD] * v
        amsgrad = _amsgrad(ch, ws[c])
        x_tau = None
        if amsgrad:
            sx = torch.cat(
                [sw.new_zeros(s.shape[0]) if slot[4] is None else slot[4].reshape(-1)[s] for slot, s in zip(ws[c], sel)]
            )
            x_tau = sx[pos]
        # a layer without amsgrad reads a maximum of 0 here, so max(0, q') = q': its own rule
        m_tau, q_tau, x_tau, step = _adam(mom[0][pos], mom[1][pos], x_tau, d, tab, tsc)
        v_new = v * tsc[:, 2] - tsc[:, 0] * step
        ratio = v_new / v
        min_ratio = hpm[0, MIN_RATIO]
        is_free = free != 0
        hit = torch.logical_not(ratio >= min_ratio) & is_free
        ratio = torch.where(hit, min_ratio, ratio)
        ratio = torch.where(is_free, ratio, 1.0)  # a sigma entry that is a tau edge does not move
        rho = torch.cat([ratio, one])[first_free]
        w_tau_new = w_tau * ratio / torch.cat([rho, one])[nxt]
        F_rows = torch.cat([F, F_last])
        r_rows = torch.reciprocal(F_rows)
        rhoinv = torch.cat([torch.reciprocal(rho), ones_last])
        q = r_rows * rhoinv
        # the eager step's checks (adam_chain.prepare_adam_chain)
        checks += [B, F_rows, gamma, base_h, m_tau, q_tau, ratio, w_tau_new, r_rows, torch.reciprocal(B)]
        checks += [rhoinv, q[:H].square()]
        if x_tau is not None:
            checks.append(x_tau)
        inputs += [torch.stack(torch.aminmax(g)) for g, h in zip(g2, ch.is_hidden) if not h]
        hits.append(hit.sum())
        per_node = [B, torch.reciprocal(B), w_tau_new, m_tau, q_tau] + ([] if x_tau is None else [x_tau])
        # then a column for inputs from outside the chain (B = 1, no tau edge)
        outside = [one, one] + [one * 0] * (len(per_node) - 2)
        per_node = torch.cat([torch.stack(per_node), torch.stack(outside)], 1)
        vecs.append(torch.cat([F_rows, r_rows, rhoinv, per_node[:, col_node].reshape(-1)]))
    inputs_ok = torch.isfinite(torch.cat(inputs)).all()
    ok = inputs_ok & torch.isfinite(torch.cat(checks)).all()
    return ok, inputs_ok, torch.stack(hits).sum() * ok, vecs, scs, stored


def _amsgrad(ch: GraphChain, slots: list[Slot]) -> bool:
    """Whether a layer that holds tau edges (one that reads hidden nodes) keeps ``max_exp_avg_sq``."""
    return any(s[4] is not None for s, reads in zip(slots, ch.reads_hidden) if reads)


def _new_values(
    slot: Slot, s: Tensor | float, f: Tensor | float, rhoinv: Tensor | None, hp: Tensor, sc: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``(w', m', q', max')`` of one tensor: ``d = s g + wd f w``, torch's moments, and
    ``w' = (decay w - step_size s m' / denom) / rho`` (``rhoinv`` ``None`` means 1)."""
    w, g, m, q, x, _ = slot
    assert g is not None and m is not None and q is not None
    d = s * g + hp[WD] * (f * w)
    m1, q1, x1, step = _adam(m, q, x, d, hp, sc)
    new = sc[2] * w - sc[0] * (s * step)
    if rhoinv is not None:
        new = new * rhoinv
    return new, m1, q1, x1


def _write(slot: Slot, new: Tensor, m1: Tensor, q1: Tensor, x1: Tensor | None, ok: Tensor) -> None:
    """Write a tensor's step where ``ok``, and advance its ``step`` counter there."""
    w, _, m, q, x, step = slot
    assert m is not None and q is not None and step is not None
    w.copy_(torch.where(ok, new, w))
    m.copy_(torch.where(ok, m1, m))
    q.copy_(torch.where(ok, q1, q))
    if x is not None and x1 is not None:
        x.copy_(torch.where(ok, x1, x))
    step.add_(ok.to(step.dtype))


def _update(
    chains: list[GraphChain],
    ws: list[list[Slot]],
    bs: list[list[Slot | None]],
    hps: list[Tensor],
    vecs: list[Tensor],
    scs: list[Tensor],
    ok: Tensor,
) -> None:
    """Phase two: every chain tensor's new value and moments, in place, where ``ok`` (see the module
    docstring); with ``s = 1 / (F B)`` per entry (1 / F for biases) and ``f = 1 / s``."""
    for c, ch in enumerate(chains):
        L = ch.n_layers
        md = math_dtype(ws[c][0][0].dtype)
        hp, sc = hps[c].to(md), scs[c]
        R = ch.n_rows
        vec = vecs[c]
        F_rows, r_rows, rhoinv = vec[:R], vec[R : 2 * R], vec[2 * R : 3 * R]
        n_vec = 6 if _amsgrad(ch, ws[c]) else 5
        Kt = (vec.shape[0] - 3 * R) // n_vec
        per = [vec[3 * R + j * Kt : 3 * R + (j + 1) * Kt] for j in range(n_vec)]
        B, Binv, w_tau, m_tau, q_tau = per[:5]
        x_tau = per[5] if n_vec == 6 else None
        for l in range(L):
            n_out, K = ch.shape2[l]
            rs = slice(ch.row_off[l], ch.row_off[l] + n_out)
            slot = ws[c][l]
            w = slot[0]
            row_shape = (n_out,) + (1,) * (w.dim() - 1)
            ent_shape = (1, *w.shape[1:])
            r, f, h = r_rows[rs].view(row_shape), F_rows[rs].view(row_shape), rhoinv[rs].view(row_shape)
            ks = slice(ch.koff[l], ch.koff[l] + K)
            s = r
            if ch.reads_hidden[l]:
                s, f = r * Binv[ks].view(ent_shape), f * B[ks].view(ent_shape)
            new, m1, q1, x1 = _new_values(slot, s, f, h if ch.is_hidden[l] else None, hp[l], sc[l])
            sig_at, tau_at = ch.fspec[l]
            if sig_at >= 0:  # sigma entries: weight kept, moments 0
                sig = ch.floats[:K].view(ent_shape) == ch.floats[sig_at : sig_at + n_out].view(row_shape)
                new = torch.where(sig, w, new)
                m1, q1 = torch.where(sig, 0.0, m1), torch.where(sig, 0.0, q1)
                x1 = None if x1 is None else torch.where(sig, 0.0, x1)
            if tau_at >= 0:  # free tau entries: the values of phase one
                tau = ch.floats[:n_out].view(row_shape) == ch.floats[tau_at : tau_at + K].view(ent_shape)
                new = torch.where(tau, w_tau[ks].view(ent_shape), new)
                m1 = torch.where(tau, m_tau[ks].view(ent_shape), m1)
                q1 = torch.where(tau, q_tau[ks].view(ent_shape), q1)
                if x1 is not None and x_tau is not None:
                    x1 = torch.where(tau, x_tau[ks].view(ent_shape), x1)
            _write(slot, new, m1, q1, x1, ok)
            if not ch.is_hidden[l]:
                continue
            # the hidden bias (row L + l), then the tied parameters (rows 2L + i)
            for t, row in ch.row_inputs(l):
                b = bs[c][t]
                if b is None:
                    continue
                if b[1] is None:  # no gradient: the path value is kept, the row's rescale followed
                    b[0].copy_(torch.where(ok, b[0] * rhoinv[rs], b[0]))
                    continue
                _write(b, *_new_values(b, r_rows[rs], F_rows[rs], rhoinv[rs], hp[row], sc[row]), ok)


def _step(
    chains: list[GraphChain],
    ws: list[list[Slot]],
    bs: list[list[Slot | None]],
    hps: list[Tensor],
    plain: list[Slot],
    pnorm: tuple[bool, ...],
    ptab: Tensor,
    counters: list[Tensor],
) -> tuple[Tensor, list[Tensor]]:
    """Both phases, then the parameters outside chains (``plain``, one row of ``ptab`` each): torch's
    Adam/AdamW, or where ``pnorm`` marks the weight of an S2 layer outside chains, Adam on the slice
    ``|w_k| = 1`` (:func:`lightning_gsgd.step.normalized.adam_normalized_step`);
    ``counters = [steps, skipped_steps, guard_hits, collapsed_steps]`` are added to. Returns ``(ok, vecs)``."""
    scales = {i: row_scale(p[0]) for i, p in enumerate(plain) if pnorm[i]}
    norms = [q for q, _ in scales.values()]
    ok, inputs_ok, hits, vecs, scs, stored = _prepare(chains, ws, bs, hps, [p[1] for p in plain], norms)  # type: ignore[misc]
    _update(chains, ws, bs, hps, vecs, scs, ok)
    if plain:
        dtype = plain[0][0].dtype
        psc = _scalars(ptab, torch.stack([p[5].to(ptab.dtype) for p in plain]), math_dtype(dtype))  # type: ignore[union-attr]
        pt = ptab.to(math_dtype(dtype))
        for i, p in enumerate(plain):  # torch's rule is the path-space rule with s = f = 1, no rescale
            s: Tensor | float = 1.0
            f: Tensor | float = 1.0
            if pnorm[i]:
                q = scales[i][0]
                s = q.clamp_min(torch.finfo(q.dtype).tiny)
                f = torch.reciprocal(s)
            _write(p, *_new_values(p, s, f, None, pt[i], psc[i]), ok)
    steps, skipped, guard, collapsed = counters
    steps.add_(ok.long())
    skipped.add_(torch.logical_not(ok).long())
    guard.add_(hits)
    collapsed.add_((inputs_ok & torch.logical_not(ok)).long())
    return ok, vecs + stored  # returned so that Inductor stores them once (see graph.py)


def flat_args(
    chains: list[GraphChain],
    ws: list[list[Slot]],
    bs: list[list[Slot | None]],
    hps: list[Tensor],
    plain: list[Slot],
    pnorm: tuple[bool, ...],
    ptab: Tensor,
    counters: list[Tensor],
) -> list[Tensor | None]:
    """:func:`_step`'s tensors (and the chains' index tensors; ``pnorm`` holds none) as one flat list in a
    fixed order for one step structure: the positions that
    :meth:`~lightning_gsgd.step.direct_call.InductorCapture.bind` maps the graph's inputs to."""
    out: list[Tensor | None] = []
    for ch in chains:
        out += (ch.ints, ch.floats)
    for part in ws:
        for s in part:
            out += s
    for opt_part in bs:
        for b in opt_part:
            if b is not None:
                out += b
    out += hps
    for s in plain:
        out += s
    out.append(ptab)
    out += counters
    return out


class AdamGraphs:
    """The compiled G-Adam step of one optimizer: one graph per step structure, compiled on first use
    (the same scheme as :class:`lightning_gsgd.step.graph.ChainGraphs`: Dynamo keeps only tensor
    guards, the structure is keyed here, and each key compiles its own copy of :func:`_step`).

    Args:
        options: Extra keyword arguments for ``torch.compile`` (tests use ``backend="eager"``).
    """

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.compiled: dict[tuple, tuple[Any, list[GraphChain]]] = {}

    def compiled_for(
        self,
        chains: list[GraphChain],
        bs: list[list[Slot | None]],
        ws: list[list[Slot]],
        plain: list[Slot],
        pnorm: tuple[bool, ...],
    ) -> Any:
        """The compiled :func:`_step` for this structure (compiled on first use, then reused)."""
        key = (
            tuple(id(ch) for ch in chains),
            ws[0][0][0].device.type,  # which Inductor wrapper (use_cpp_wrapper)
            tuple(s[4] is None for chain in ws for s in chain),
            tuple(b is None or b[1] is None for chain in bs for b in chain),
            tuple(b is not None and b[1] is not None and b[4] is None for chain in bs for b in chain),
            tuple(p[4] is None for p in plain),
            pnorm,
        )
        entry = self.compiled.get(key)
        if entry is None:
            small = use_cpp_wrapper([s[0] for chain in ws for s in chain])
            entry = (compile_step(_step, self.options, "GAdam", small, flat_args), chains)
            self.compiled[key] = entry
        return entry[0]
