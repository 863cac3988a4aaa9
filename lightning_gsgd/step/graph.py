"""The whole G-SGD step of every chain as one ``torch.compile`` graph (``GSGD(compiled=True)``).

The eager step (:mod:`lightning_gsgd.step.chain_step`) runs ~20 small ops per layer plus ~35 on the O(H)
vectors, each a separate call; on a small network (a 4-conv CNN has 0.1 M weights) that per-op cost, not the
arithmetic, is the step. Here the same mathematics (docs/math.md, "The inverse chain rule" and "The cheap
form") is written as plain tensor expressions over *every* chain of the model, compiled into one graph:

* phase one (:func:`_prepare`): the skeleton gathers, the per-row sums ``sum(w * g)``, ``B``,
  ``F``, ``Gamma``, the free tau step with its guard, ``rho``, the new skeleton values, and the
  step's finiteness flag ``ok`` over all chains and the gradients of the parameters outside chains;
  per chain it produces one small vector of per-row and per-entry values, which the graph returns,
  so Inductor stores it once instead of recomputing its gathers inside the big loops;
* phase two (:func:`_update`): one pass per tensor that reads ``w``, ``g`` and the buffer and writes
  the new ``w`` and buffer; sigma and free tau entries are picked by comparing each entry's row and
  column with small per-row and per-column vectors (no weight-sized mask, no scatter, which would
  make Inductor write the tensor twice), and nothing is written unless ``ok`` (``torch.where``), so
  the step never reads a flag on the host; the parameters outside chains (torch's SGD rule) and
  the step counters are updated in the graph too.

The row sums treat each weight as an ``[n_out, K]`` matrix, ``K = n_in * taps`` (entry ``k`` of a
row is input node ``k // taps``, tap ``k % taps``); the update works in the tensor's own shape, with
the per-row and per-entry vectors viewed to broadcast against it (Inductor merges the contiguous
dimensions into one vectorized loop; reshaping the result before its in-place copy instead made
Inductor write every conv weight and buffer to a temporary first). The chain's index tensors
travel as one int64 and one float32 tensor (few inputs: each input costs wrapper and guard time on
every call).

Hyper-parameters enter as a float64 table with one row per chain tensor,
``[lr, wd, k_buf, k_d, a_d, a_buf, min_ratio]``: the new buffer is ``k_buf buf + k_d d`` and the
direction ``a_d d + a_buf buf'`` (``d`` the path-space gradient with weight decay), so momentum,
dampening, Nesterov and the first momentum step are numbers, and a scheduler changes no graph.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_gsgd.step.auto_compile import use_cpp_wrapper
from lightning_gsgd.step.graph_chain import (
    A_BUF,
    A_D,
    K_BUF,
    K_D,
    LR,
    MIN_RATIO,
    WD,
    GraphChain,
    compile_step,
    math_dtype,
    normalized_f,
    piece,
    row_sums,
)
from lightning_gsgd.step.normalized import row_scale


def _prepare(
    chains: list[GraphChain],
    ws: list[list[Tensor]],
    gs: list[list[Tensor]],
    bufs: list[list[Tensor | None]],
    bws: list[list[Tensor | None]],
    bgs: list[list[Tensor | None]],
    hps: list[Tensor],
    extra: list[Tensor],
    extra_factors: list[Tensor],
) -> tuple[Tensor, Tensor, Tensor, list[Tensor], list[Tensor]]:
    """Phase one over every chain: returns ``(ok, inputs_ok, hits, vecs, stored)``.

    Per chain ``c``: ``ws[c][l]``, ``gs[c][l]``, ``bufs[c][l]`` are layer ``l``'s weight, gradient and
    momentum buffer (``None``: no momentum), ``bws``/``bgs`` the hidden biases and their gradients
    (``None``: no bias, or one without gradient, and always for output layers), then the tied
    parameters (``GraphChain.tied_layer``), ``hps[c]`` the ``[2L + T, 7]`` hyper-parameter table
    (weights, then biases, then the ``T`` tied parameters). ``extra`` are the gradients of the parameters
    outside chains: ``ok`` needs them finite too, and ``extra_factors`` (the row norms of the S2
    layers outside chains). ``inputs_ok`` says whether the gradients checked
    directly (those outside chains, each chain's output layers) were finite: a step that is not ``ok``
    although they were is counted as a collapse. ``vecs[c]``
    is ``[F, 1 / F, 1 / rho]`` over the chain's rows, then ``B``, ``1 / B``, the new tau weight and the
    new tau buffer entry of the input node of every entry ``k`` of the layers that read hidden nodes. ``hits``
    counts clamped free tau values (0 when the step is not ``ok``). ``stored`` holds what the graph
    must return besides ``vecs`` for Inductor to store it once (``B`` per entry of the chains with S2
    layers, :func:`~lightning_gsgd.step.graph_chain.normalized_f`).
    """
    inputs = [torch.stack(torch.aminmax(g)).reshape(2).to(ws[0][0].dtype) for g in extra]
    checks: list[Tensor] = [f.reshape(-1).to(ws[0][0].dtype) for f in extra_factors]
    hits = []
    vecs = []
    stored: list[Tensor] = []
    for c, ch in enumerate(chains):
        L, H = ch.n_layers, ch.hidden
        sel = [piece(ch.ints, spec) for spec in ch.ispec[:L]]
        (walk_bf, walk_g_rows, tau_take, sig_take, free, first_free, nxt, free_pos, free_nodes, tau_layer, col_node) = (
            piece(ch.ints, spec) for spec in ch.ispec[L:-1]
        )
        w2 = [w.view(s) for w, s in zip(ws[c], ch.shape2)]
        g2 = [g.view(s) for g, s in zip(gs[c], ch.shape2)]
        hp = hps[c].to(math_dtype(w2[0].dtype))
        one = w2[0].new_ones(1)
        sw = torch.cat([w.reshape(-1)[s] for w, s in zip(w2, sel)])
        sg = torch.cat([g.reshape(-1)[s] for g, s in zip(g2, sel)])
        sb = torch.cat([sw.new_zeros(s.shape[0]) if b is None else b.reshape(-1)[s] for b, s in zip(bufs[c], sel)])
        skel = torch.cat([sw, one, sg, sb])
        rows = []
        for l in range(L):
            if not ch.is_hidden[l]:
                continue
            r = row_sums(w2[l] * g2[l])
            for t, _ in ch.row_inputs(l):  # the hidden bias, the tied parameters
                bw, bg = bws[c][t], bgs[c][t]
                if bw is not None and bg is not None:
                    r = r + bw * bg
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
        tab = hp[tau_layer]  # a node's tau edge lies in layer tau_layer: that weight's row
        w_tau, g_tau, m_tau = skel[tau_take].unbind(0)
        v = B * F
        d = (g_tau * w_tau - gamma) / v + tab[:, WD] * v
        momentum = any(b is not None for b in bufs[c])
        if momentum:
            buf_tau = tab[:, K_BUF] * m_tau + tab[:, K_D] * d
            direction = tab[:, A_D] * d + tab[:, A_BUF] * buf_tau
        else:
            buf_tau = torch.zeros_like(d)
            direction = d
        v_new = v - tab[:, LR] * direction
        ratio = v_new / v
        min_ratio = hp[0, MIN_RATIO]
        hit = torch.logical_not(ratio >= min_ratio) & (free != 0)
        ratio = torch.where(hit, min_ratio, ratio)
        rho = torch.cat([ratio, one])[first_free]
        w_tau_new = w_tau * ratio / torch.cat([rho, one])[nxt]
        F_rows = torch.cat([F, F_last])
        r_rows = torch.reciprocal(F_rows)
        rhoinv = torch.cat([torch.reciprocal(rho), ones_last])
        q = r_rows * rhoinv
        # the eager step's check (chain_step.prepare_chain): every per-row factor, the new
        # skeleton block and buffer entries, the floor 1 / F'^2, the row sums and the last gradient
        checks += [B, F_rows, rhoinv, r_rows, q, r_rows * q, sw.index_copy(0, free_pos, w_tau_new[free_nodes])]
        checks += [q[:H].square(), base_h]
        inputs += [torch.stack(torch.aminmax(g)) for g, h in zip(g2, ch.is_hidden) if not h]
        if momentum:
            checks.append(sb.index_copy(0, free_pos, buf_tau[free_nodes]))
        hits.append(hit.sum())
        # per node, then a column for inputs from outside the chain (B = 1, no tau edge)
        per_node = torch.stack([B, torch.reciprocal(B), w_tau_new, buf_tau])
        per_node = torch.cat([per_node, torch.stack([one, one, one * 0, one * 0])], 1)
        vecs.append(torch.cat([F_rows, r_rows, rhoinv, per_node[:, col_node].reshape(-1)]))
    inputs_ok = torch.isfinite(torch.cat(inputs)).all()
    ok = inputs_ok & torch.isfinite(torch.cat(checks)).all()
    return ok, inputs_ok, torch.stack(hits).sum() * ok, vecs, stored


def _update(
    chains: list[GraphChain],
    ws: list[list[Tensor]],
    gs: list[list[Tensor]],
    bufs: list[list[Tensor | None]],
    bws: list[list[Tensor | None]],
    bgs: list[list[Tensor | None]],
    bbufs: list[list[Tensor | None]],
    hps: list[Tensor],
    vecs: list[Tensor],
    ok: Tensor,
) -> None:
    """Phase two: write every chain tensor's new value and buffer, in place, where ``ok``.

    Per tensor, with ``s = 1 / (F B)`` (``F`` per row, ``B`` of the input node per entry; 1 for
    biases and the first layer) and ``f = 1 / s``: ``d = s g + wd f w``; with a buffer
    ``buf' = k_buf buf + k_d d`` and ``dir = a_d d + a_buf buf'``, without one ``dir = d``;
    ``w' = (w - lr s dir) / rho``. Sigma entries keep their weight and buffer; free tau entries take
    the new tau weight and buffer entry from ``vecs``.
    """
    for c, ch in enumerate(chains):
        L = ch.n_layers
        hp = hps[c].to(math_dtype(ws[c][0].dtype))
        R = ch.n_rows
        vec = vecs[c]
        F_rows, r_rows, rhoinv = vec[:R], vec[R : 2 * R], vec[2 * R : 3 * R]
        Kt = (vec.shape[0] - 3 * R) // 4
        B, Binv, w_tau_new, buf_tau = (vec[3 * R + j * Kt : 3 * R + (j + 1) * Kt] for j in range(4))
        for l in range(L):
            n_out, K = ch.shape2[l]
            rs = slice(ch.row_off[l], ch.row_off[l] + n_out)
            # in the tensor's own shape, the per-row and per-entry vectors broadcast against it (a
            # reshape of the result before its in-place copy would make Inductor write a temporary)
            w, g, buf = ws[c][l], gs[c][l], bufs[c][l]
            row_shape = (n_out,) + (1,) * (w.dim() - 1)
            ent_shape = (1, *w.shape[1:])
            r, f, h = r_rows[rs].view(row_shape), F_rows[rs].view(row_shape), rhoinv[rs].view(row_shape)
            ks = slice(ch.koff[l], ch.koff[l] + K)
            s = r
            if ch.reads_hidden[l]:
                s, f = r * Binv[ks].view(ent_shape), f * B[ks].view(ent_shape)
            new, nb = _new_values(w, g, buf, s, f, h if ch.is_hidden[l] else None, hp[l])
            # the skeleton entries: sigma (entry sig_k[b] of row b), free tau (row tau_k[k] of entry
            # k); compared as floats, which vectorize better than int64 indices
            sig_at, tau_at = ch.fspec[l]
            if sig_at >= 0:
                sig = ch.floats[:K].view(ent_shape) == ch.floats[sig_at : sig_at + n_out].view(row_shape)
                new = torch.where(sig, w, new)
                if nb is not None and buf is not None:
                    nb = torch.where(sig, buf, nb)
            if tau_at >= 0:
                tau = ch.floats[:n_out].view(row_shape) == ch.floats[tau_at : tau_at + K].view(ent_shape)
                new = torch.where(tau, w_tau_new[ks].view(ent_shape), new)
                if nb is not None:
                    nb = torch.where(tau, buf_tau[ks].view(ent_shape), nb)
            w.copy_(torch.where(ok, new, w))
            if nb is not None and buf is not None:
                buf.copy_(torch.where(ok, nb, buf))
            if not ch.is_hidden[l]:
                continue
            # the hidden bias (table row L + l), then the tied parameters (rows 2L + i)
            for t, row in ch.row_inputs(l):
                bw, bg, bb = bws[c][t], bgs[c][t], bbufs[c][t]
                if bw is not None and bg is not None:
                    new_b, nb_b = _new_values(bw, bg, bb, r_rows[rs], F_rows[rs], rhoinv[rs], hp[row])
                    bw.copy_(torch.where(ok, new_b, bw))
                    if nb_b is not None and bb is not None:
                        bb.copy_(torch.where(ok, nb_b, bb))


def _new_values(
    w: Tensor, g: Tensor, buf: Tensor | None, s: Tensor | float, f: Tensor | float, rhoinv: Tensor | None, hp: Tensor
) -> tuple[Tensor, Tensor | None]:
    """``(w', buf')`` of one tensor (see :func:`_update`); ``rhoinv`` ``None`` means 1."""
    d = s * g + hp[WD] * (f * w)
    nb = None
    direction = d
    if buf is not None:
        nb = hp[K_BUF] * buf + hp[K_D] * d
        direction = hp[A_D] * d + hp[A_BUF] * nb
    new = w - hp[LR] * (s * direction)
    if rhoinv is not None:
        new = new * rhoinv
    return new, nb


def _step(
    chains: list[GraphChain],
    ws: list[list[Tensor]],
    gs: list[list[Tensor]],
    bufs: list[list[Tensor | None]],
    bws: list[list[Tensor | None]],
    bgs: list[list[Tensor | None]],
    bbufs: list[list[Tensor | None]],
    hps: list[Tensor],
    plain: tuple[list[Tensor], list[Tensor], list[Tensor | None], Tensor],
    norm: tuple[list[Tensor], list[Tensor], list[Tensor | None], Tensor],
    counters: list[Tensor],
) -> tuple[Tensor, list[Tensor]]:
    """Both phases, then the S2 layers outside chains and SGD on the other parameters outside chains;
    returns ``(ok, vecs + stored)`` (see :func:`_prepare`).

    ``plain = (params, grads, buffers, table)`` holds the parameters outside chains, with one
    table row each (torch's SGD rule: ``d = g + wd p``, the buffer and direction as above,
    ``p' = p - lr dir``); ``norm``, in the same form, the weights of the S2 layers outside chains
    (the path-space rule with ``s = |w_k|`` per row, :mod:`lightning_gsgd.step.normalized`).
    ``counters = [steps, skipped_steps, guard_hits, collapsed_steps]`` are added to.
    """
    ps, pgs, pbufs, ptab = plain
    ns, ngs, nbufs, ntab = norm
    scales = [row_scale(w) for w in ns]
    ok, inputs_ok, hits, vecs, stored = _prepare(chains, ws, gs, bufs, bws, bgs, hps, pgs + ngs, [q for q, _ in scales])
    _update(chains, ws, gs, bufs, bws, bgs, bbufs, hps, vecs, ok)
    for i, (w, g, buf) in enumerate(zip(ns, ngs, nbufs)):
        q, inv = scales[i]
        new_w, nb = _new_values(w, g, buf, q, inv, None, ntab[i].to(math_dtype(w.dtype)))
        if nb is not None and buf is not None:
            buf.copy_(torch.where(ok, nb, buf))
        w.copy_(torch.where(ok, new_w, w))
    for i, (p, g, buf) in enumerate(zip(ps, pgs, pbufs)):
        # torch's SGD rule is the path-space rule with s = f = 1 and no rescale
        new_p, nb = _new_values(p, g, buf, 1.0, 1.0, None, ptab[i].to(math_dtype(p.dtype)))
        if nb is not None and buf is not None:
            buf.copy_(torch.where(ok, nb, buf))
        p.copy_(torch.where(ok, new_p, p))
    steps, skipped, guard, collapsed = counters
    steps.add_(ok.long())
    skipped.add_(torch.logical_not(ok).long())
    guard.add_(hits)
    collapsed.add_((inputs_ok & torch.logical_not(ok)).long())
    return ok, vecs + stored  # returned so that Inductor stores them (see the module docstring)


def flat_args(
    chains: list[GraphChain],
    ws: list[list[Any]],
    gs: list[list[Any]],
    bufs: list[list[Any]],
    bws: list[list[Any]],
    bgs: list[list[Any]],
    bbufs: list[list[Any]],
    hps: list[Tensor],
    plain: tuple[list[Any], list[Any], list[Any], Tensor],
    norm: tuple[list[Any], list[Any], list[Any], Tensor],
    counters: list[Any],
) -> list[Any]:
    """The compiled step's arguments (:func:`_step`'s, and the chains' index tensors) as one flat list
    in a fixed order: the positions that :meth:`~lightning_gsgd.step.direct_call.InductorCapture.bind`
    maps the graph's inputs to."""
    out: list[Any] = []
    for ch in chains:
        out += (ch.ints, ch.floats)
    for nested in (ws, gs, bufs, bws, bgs, bbufs):
        for part in nested:
            out += part
    out += hps
    for ps, pgs, pbufs, tab in (plain, norm):
        out += ps
        out += pgs
        out += pbufs
        out.append(tab)
    out += counters
    return out


class ChainGraphs:
    """The compiled step of one optimizer: one graph per step structure, compiled on first use.

    Dynamo's guards over the non-tensor inputs (the :class:`GraphChain` constants, which tensors are
    ``None``) are replaced by a key computed here (which chains, which tensors are ``None``); only
    Dynamo's tensor guards (shape, stride, dtype, device) are kept, so a tensor that changes still
    recompiles. Each key compiles its own copy of the function, so Dynamo's per-function recompile
    limit never counts more than one structure.

    Args:
        options: Extra keyword arguments for ``torch.compile`` (tests use ``backend="eager"`` and
            ``fullgraph=True``).
    """

    def __init__(self, **options: Any) -> None:
        self.options = options
        # key -> (compiled step, the chains): holding the chains keeps their ids from being reused
        self.compiled: dict[tuple, tuple[Any, list[GraphChain]]] = {}

    def compiled_for(
        self,
        chains: list[GraphChain],
        ws: list[list[Tensor]],
        bufs: list[list[Tensor | None]],
        bws: list[list[Tensor | None]],
        bgs: list[list[Tensor | None]],
        bbufs: list[list[Tensor | None]],
        pbufs: list[Tensor | None],
        nbufs: list[Tensor | None],
    ) -> Any:
        """The compiled :func:`_step` for this structure (compiled on first use, then reused)."""
        key = (
            tuple(id(ch) for ch in chains),
            ws[0][0].device.type,  # which Inductor wrapper (use_cpp_wrapper)
            tuple(b is None for lists in (bufs, bws, bgs, bbufs) for chain in lists for b in chain),
            tuple(b is None for b in pbufs),
            tuple(b is None for b in nbufs),
        )
        entry = self.compiled.get(key)
        if entry is None:
            small = use_cpp_wrapper([w for chain in ws for w in chain])
            entry = (compile_step(_step, self.options, "GSGD", small, flat_args), chains)
            self.compiled[key] = entry
        return entry[0]
