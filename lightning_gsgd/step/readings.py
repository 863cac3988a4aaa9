"""Diagnostics read off a G-SGD step as by-products (``PathDiagnostics`` on logging steps).

On a step that logs, :class:`~lightning_gsgd.diagnostics.metrics.PathDiagnostics` asks the optimizer for
these numbers instead of computing them in its own passes over the weights. The step has the chain
vectors ``B``, ``F``, the path values and gradients of the skeleton entries and the per-row factors
at hand; what it adds is a few row reductions per layer (``sum (g / B)^2``, ``sum w^2``, the column
sums of ``w^2``, and after the step ``sum buf^2``), read passes without temporaries when every
``B`` is 1. Definitions are those of :mod:`lightning_gsgd.diagnostics.metrics`; with ``s = 1 / (B F)`` per
entry:

* ``grad_sq = sum_rows r^2 sum (g / B)^2`` over every entry, minus the sigma and free tau entries'
  ``(s g)^2 = (g w / v)^2``, plus the free tau entries' corrected ``(dL/dv)^2`` and the hidden
  biases' ``(g_b / F)^2``;
* ``value_sq = sum_rows F^2 sum (w B)^2`` minus the sigma entries' ``v^2 = (B F)^2``, plus ``(b F)^2``;
* ``update_sq``: the path-space step moves every non-skeleton coordinate by ``-lr * direction``
  exactly (the map back preserves it), so with momentum ``lr^2 ||buf'||^2`` over the slots (the
  buffer is zero at sigma entries), and without it ``lr^2 ||s g + wd v||^2`` expanded into the row
  sums above and ``sum w g``; the free tau entries are replaced by their guarded ``v' - v``.

Supported: every chain slot with momentum and no Nesterov, or every slot without momentum and one
``(lr, weight_decay)``; float32 or float64 parameters. Otherwise :func:`supported` says no and the
diagnostics compute everything themselves.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_gsgd.step.hyper import Hyper
from lightning_gsgd.step.slots import ChainReading, Prepared
from lightning_gsgd.step.work import ChainWork


def supported(hypers: list[Hyper], dtype: torch.dtype) -> bool:
    """Whether the step can produce the readings of a chain whose tensors have these hyper-parameters."""
    if dtype not in (torch.float32, torch.float64) or not hypers:
        return False
    if all(hp.momentum != 0 and not hp.nesterov for hp in hypers):
        return True
    first = hypers[0]

    def same_lr(lr: float | Tensor) -> bool:  # tensors by identity: comparing values would read them
        return lr is first.lr or not isinstance(lr, Tensor) and not isinstance(first.lr, Tensor) and lr == first.lr

    return all(hp.momentum == 0 and same_lr(hp.lr) and hp.weight_decay == first.weight_decay for hp in hypers)


def _row_sq(t: Tensor, col: Tensor | None) -> Tensor:
    """Per row of an ``[n_out, n_in, taps]`` tensor: ``sum (t * col)^2`` (``col`` per input node)."""
    if col is not None:
        t = t * col.view(1, -1, 1)
    return torch.linalg.vector_norm(t, dim=(1, 2)).square()


def _sq_rows_cols(work: ChainWork, l: int, w3: Tensor) -> tuple[Tensor, Tensor]:
    """Row sums and per-input-node column sums of ``w^2`` (``[n_out, n_in, taps]``), in one pass.

    Squares a chunk of rows at a time into the work area's scratch (a column reduction straight
    over the weight is a strided pass, an order of magnitude slower on the CPU).
    """
    n, n_in, taps = w3.shape
    k = n_in * taps
    w = w3.reshape(n, k)
    hidden = work.chunk_rows[l] > 0
    step = work.chunk_rows[l] if hidden else n
    rows = w.new_empty(n)
    cols = w.new_zeros(k)
    for i in range(0, n, step):
        j = min(n, i + step)
        tmp = work.scratch[: (j - i) * k].view(j - i, k) if hidden else w.new_empty(j - i, k)
        torch.mul(w[i:j], w[i:j], out=tmp)
        torch.sum(tmp, 1, out=rows[i:j])
        cols += tmp.sum(0)
    return rows, cols.view(n_in, taps).sum(1)


def read_before(prep: Prepared, tau: dict[str, Tensor]) -> ChainReading:
    """The before-step readings of a chain whose O(H) solve just ran (``tau``: its intermediates)."""
    work: ChainWork = prep.work
    plan = work.plan
    general = not prep.unit_b
    grad_rows = work.vec.new_zeros(())
    value_rows = work.vec.new_zeros(())
    incoming = work.vec.new_empty(plan.hidden)
    outgoing = work.vec.new_zeros(plan.hidden + 1)  # + a slot for columns from outside the chain
    row_g2, row_w2 = [], []
    for l, s in enumerate(prep.weights):
        w, g = s.param, s.grad
        bcol = plan.cols(work.B_ext, l) if plan.reads_hidden[l] else None
        g2 = _row_sq(g, bcol.reciprocal() if (general and bcol is not None) else None)
        if plan.reads_hidden[l]:
            w2raw, col = _sq_rows_cols(work, l, w)
            outgoing.index_add_(0, plan.col_node[l], col)
        else:
            w2raw = torch.linalg.vector_norm(w, dim=(1, 2)).square()
        w2 = _row_sq(w, bcol) if (general and bcol is not None) else w2raw
        row_g2.append(g2)
        row_w2.append(w2)
        grad_rows = grad_rows + torch.dot(work.row1["r"][l].square(), g2)
        value_rows = value_rows + torch.dot(work.row1["F"][l].square(), w2)
        if plan.is_hidden[l]:
            b = prep.biases[l]
            bias = prep.bias_params[l]
            inc = w2raw if bias is None else w2raw + bias.square()
            incoming[plan.row_off[l] : plan.row_off[l] + plan.n_out[l]] = inc
            if bias is not None:
                Fl = work.row1["F"][l]
                value_rows = value_rows + torch.dot(bias.square(), Fl.square())
                if b is not None:
                    grad_rows = grad_rows + torch.dot(b.grad.square(), work.row1["r"][l].square())
    v, sig_term, tau_term, d0 = tau["v"], tau["sig_sg"], tau["tau_sg"], tau["d0"]
    free = plan.free_nodes
    grad_sq = grad_rows - sig_term.square().sum() - tau_term.index_select(0, free).square().sum()
    grad_sq = grad_sq + d0.index_select(0, free).square().sum()
    value_sq = value_rows - v.square().sum()
    skeleton_abs = v.index_select(0, free).abs()
    H = plan.hidden
    terms = 0.5 * (torch.log(incoming) - torch.log(outgoing[:H]))
    prep.row_sq = (row_g2, row_w2)
    reading = ChainReading(grad_sq, value_sq, skeleton_abs, terms)
    hp = prep.weights[0].hp
    if hp.momentum == 0:  # the whole update is known before the step
        reading.update_sq = update_plain(prep, tau, hp.lr, hp.weight_decay)
    return reading


def update_momentum(prep: Prepared, tau: dict[str, Tensor]) -> Tensor:
    """``||v' - v||^2`` after a momentum step: ``lr^2 ||buf'||^2`` per slot, free tau entries replaced."""
    total = prep.work.vec.new_zeros(())
    for s in prep.slots():
        lr = s.hp.lr
        n = torch.linalg.vector_norm(s.buf_target).square()
        total = total + n * (lr * lr)
    return total + tau["tau_fix"]


def update_plain(prep: Prepared, tau: dict[str, Tensor], lr: float | Tensor, wd: float) -> Tensor:
    """``||v' - v||^2`` of a step without momentum (one ``lr``, ``wd``), from the before-step row sums.

    Call it before the step is written: it reads the weights and biases the step starts from.
    """
    work: ChainWork = prep.work
    plan = work.plan
    L = plan.n_layers
    assert prep.row_sq is not None
    row_g2, row_w2 = prep.row_sq
    acc = work.vec.new_zeros(())
    for l in range(L):
        acc = acc + torch.dot(work.row1["r"][l].square(), row_g2[l])
        if wd != 0:
            acc = acc + wd * wd * torch.dot(work.row1["F"][l].square(), row_w2[l])
    if wd != 0:
        # sum w g over every weight entry: the hidden rows' sums (bias and sigma terms undone), the output layers
        wg = work.base_h.sum() + tau["sig_wg"].sum() - tau["bias_wg"]
        for out, hidden in zip(prep.weights, plan.is_hidden):
            if not hidden:
                wg = wg + torch.vdot(out.param.reshape(-1), out.grad.reshape(-1))
        acc = acc + 2 * wd * wg
    v = tau["v"]
    free = plan.free_nodes
    acc = acc - (tau["sig_sg"] + wd * v).square().sum()
    acc = acc - (tau["tau_sg"] + wd * v).index_select(0, free).square().sum()
    for l in range(L):
        b = prep.biases[l]
        if b is not None and plan.is_hidden[l]:
            acc = acc + (b.grad * work.row1["r"][l] + wd * b.param * work.row1["F"][l]).square().sum()
    return acc * (lr * lr) + tau["tau_dv"]


def update_after(prep: Prepared) -> Tensor | None:
    """``||v' - v||^2`` of a chain whose step was just written (``None`` without readings)."""
    if prep.reading is None:
        return None
    assert prep.tau_aux is not None
    if prep.weights[0].hp.momentum != 0:
        return update_momentum(prep, prep.tau_aux)
    return prep.reading.update_sq  # without momentum: computed before the step was written


def collect_readings(
    prepared: list[Prepared], chain_of: list[int], updates: list[Tensor | None] | None, ok: Tensor | None
) -> dict[int, ChainReading]:
    """The readings of the chains that produced them; ``updates`` ``None``: the step was skipped."""
    out: dict[int, ChainReading] = {}
    for k, (prep, ci) in enumerate(zip(prepared, chain_of)):
        r = prep.reading
        if r is None:
            continue
        upd = None if updates is None else updates[k]
        if upd is None:
            upd = torch.zeros_like(r.grad_sq)
        elif ok is not None:
            upd = torch.where(ok, upd, torch.zeros_like(upd))
        r.update_sq = upd
        out[ci] = r
    return out
