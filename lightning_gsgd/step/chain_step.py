"""The cheap form of the G-SGD step on a chain (docs/math.md, "The cheap form"), written in place.

For an entry ``e = (a -> b)`` of a layer that is neither a sigma nor a free tau edge, with
``s = 1 / (B(a) F(b))`` and ``rho = F'(b) / F(b)``, the path-space SGD step maps back to

* no momentum: ``w' = ((1 - lr wd) w - lr s^2 g) / rho``
* momentum: ``buf' = mu buf + (1 - damp)(s g + wd w / s)`` (``buf' = s g + wd w / s`` on the first
  step), ``w' = (w - lr s buf') / rho``
* Nesterov: the same buffer, ``w' = ((1 - lr wd) w - lr s^2 g - lr mu s buf') / rho``

that is SGD with an outer-product preconditioner and a per-row rescale: a few in-place
``torch._foreach_*`` passes (:mod:`lightning_gsgd.step.passes`), no weight-sized temporaries. ``s``
is a row vector when every ``B`` is 1 (sigma weights at 1, as after
:func:`lightning_gsgd.init_skeleton_`) and an ``[n_out, n_in, 1]`` outer product otherwise. The
momentum buffer stays in path coordinates.

``rho`` needs no product over layers: ``F'(b) / F(b)`` is the ratio ``v' / v`` of the first free tau
edge on b's tau chain (the ones before it are sigma weights, which do not move), or 1. So when
nothing moves (``lr = 0``) every ratio is exactly 1 and every weight is returned bit for bit.

Only the O(H) sigma and free tau entries need more: they are gathered into the chain's skeleton
block (:class:`lightning_gsgd.step.plan.ChainPlan`), updated there with the Gamma correction of
"The inverse chain rule" and the guard, and written back after the elementwise passes (sigma weights unchanged,
their buffer entries zero). ``Gamma`` needs one row reduction ``sum(w * g)`` per hidden layer;
whether those sums are finite is also the step's non-finite check for those layers.

The step has two phases so that it can be skipped before anything is written:
:func:`prepare_chain` (reads the parameters, computes every O(H) quantity into the work area and
checks it) and :func:`apply_chain` (the elementwise passes; writes).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_gsgd.step.hyper import step_coefficients
from lightning_gsgd.step.passes import Item, bulk, slot_key
from lightning_gsgd.step.readings import read_before
from lightning_gsgd.step.slots import Prepared, Slot
from lightning_gsgd.step.work import ChainWork


def prepare_chain(
    work: ChainWork,
    weights: list[Slot],
    biases: list[Slot | None],
    min_ratio: float,
    *,
    unit_b: bool | None,
    bias_params: list[Tensor | None] | None = None,
) -> Prepared:
    """Phase one of a chain's step: gather, row sums and every O(H) quantity; writes no parameter.

    Besides the gradients and row sums, the step is checked here, before anything is written, by
    its O(H) values: the chain vectors ``B``, ``F``, the per-row factors ``1 / rho``, ``1 / F``,
    ``1 / F'`` and ``1 / (F F')``, the new free tau weights and buffer entries, and the floor
    ``1 / F'^2`` (``F' = F rho`` is the new product of tau weights below a node, the next step's
    ``F``; its inverse square is what that step's preconditioner holds). A chain passes when all of
    them are finite: so a step that would underflow a tau path value, as a guard clamped again and
    again does, is refused instead of writing inf weights.

    Args:
        work: Work area of the chain.
        weights: Per layer, the weight slot (``[n_out, n_in, taps]`` views).
        biases: Per layer, the bias slot or ``None`` (no bias, a bias without gradient, an output layer).
        min_ratio: Guard of free tau path values (see :class:`lightning_gsgd.GSGD`).
        unit_b: Whether every ``B`` is known to be 1 (row-only scaling). ``None``: find out by
            reading the values (a host read: CPU only); ``False``: use the general form.
        bias_params: Every layer's bias (detached, ``None`` where there is none): also compute the
            diagnostics readings of :mod:`lightning_gsgd.step.readings` (``prep.reading``).
    """
    plan = work.plan
    L = plan.n_layers
    momentum = any(s.hp.momentum != 0 for s in weights)
    for l, s in enumerate(weights):
        sel = plan.sel[l]
        torch.take(s.param, sel, out=work.sw_l[l])
        torch.take(s.grad, sel, out=work.sg_l[l])
        if momentum:
            if s.buf is not None:
                torch.take(s.buf, sel, out=work.sbuf_l[l])
            else:
                work.sbuf_l[l].zero_()
        if plan.is_hidden[l]:
            work.row_sums_(l, s.param, s.grad)
    for l in range(L):
        b = biases[l]
        if b is not None and plan.is_hidden[l]:
            work.base_rows[l].addcmul_(b.param, b.grad)
    for l, t in zip(plan.tied_layer, biases[L:]):  # tied parameters: hidden biases of layer l
        if t is not None:
            work.base_rows[l].addcmul_(t.param, t.grad)
    # the output layers' gradients are checked directly (the row sums check the hidden layers')
    outs = [torch.stack(torch.aminmax(s.grad)) for s, h in zip(weights, plan.is_hidden) if not h]
    last = outs[0] if len(outs) == 1 else torch.cat(outs)
    return solve_gathered(work, weights, biases, momentum, last, min_ratio, unit_b=unit_b, bias_params=bias_params)


def solve_gathered(
    work: ChainWork,
    weights: list[Slot],
    biases: list[Slot | None],
    momentum: bool,
    last_check: Tensor,
    min_ratio: float,
    *,
    unit_b: bool | None,
    bias_params: list[Tensor | None] | None = None,
) -> Prepared:
    """The rest of phase one once the work area holds the skeleton block and the per-row sums.

    :func:`prepare_chain` fills the work area from whole weights; the sharded step
    (:mod:`lightning_gsgd.step.sharded`) fills it from every rank's rows. Either way this computes
    every O(H) quantity from the same numbers.

    Args:
        work: Work area holding the skeleton block ``[S, 1, G, M]`` and ``sum(w * g)`` per hidden row
            (hidden biases' ``b * grad`` added).
        weights: Per layer, the weight slot.
        biases: Per layer, the bias slot or ``None``.
        momentum: Whether any weight has momentum.
        last_check: Values that are finite exactly when the output layers' gradients are.
        min_ratio: Guard of free tau path values.
        unit_b: As for :func:`prepare_chain`.
        bias_params: As for :func:`prepare_chain`.
    """
    plan = work.plan
    w_sig, g_sig = work.skel.take(plan.sig_take).unbind(0)
    work.base_h.addcmul_(w_sig, g_sig, value=-1)
    # unit_b, hits, factor_check and tau_buf are placeholders that _solve sets
    lo = last_check[0]
    prep = Prepared(
        work,
        list(weights),
        list(biases),
        momentum,
        last_check,
        unit_b=False,
        hits=lo,
        factor_check=lo,
        tau_buf=False,
        bias_params=bias_params,
    )
    _solve(prep, min_ratio, unit_b)
    if bias_params is not None:
        assert prep.tau_aux is not None
        prep.reading = read_before(prep, prep.tau_aux)
    return prep


def _tau_row(s: Slot) -> tuple:
    """:func:`step_coefficients` of a slot."""
    return step_coefficients(s.hp, s.buf is not None)


def _tau_coefficients(prep: Prepared) -> tuple:
    """Per-tau-entry coefficients (:func:`_tau_row`): scalars if all tau layers agree, else ``[H]`` vectors."""
    slots = [prep.weights[l] for l in prep.work.plan.tau_layers]
    first = slots[0]
    if all(
        (s.hp is first.hp and (s.buf is None) == (first.buf is None)) or slot_key(s) == slot_key(first) for s in slots
    ):
        return _tau_row(first)
    work = prep.work
    plan = work.plan
    table = torch.zeros((plan.n_layers, 6), dtype=work.dtype, device=work.device)
    for l, s in zip(plan.tau_layers, slots):
        for k, val in enumerate(_tau_row(s)):
            if isinstance(val, Tensor):
                table[l, k].copy_(val)
            elif val != 0:
                table[l, k].fill_(val)
    per = table.index_select(0, plan.tau_layer)
    return tuple(per[:, k] for k in range(6))


def _is(x: float | Tensor, value: float) -> bool:
    return not isinstance(x, Tensor) and x == value


def _axpy(y: Tensor, x: Tensor, a: float | Tensor) -> Tensor:
    """``y += a * x`` in place, ``a`` a number or a broadcastable tensor."""
    return y.addcmul_(x, a) if isinstance(a, Tensor) else y.add_(x, alpha=a)


def _solve(prep: Prepared, min_ratio: float, unit_b: bool | None) -> None:
    """The O(H) part of the step, into the work area: B, F, Gamma, the free tau step with its guard,
    rho and the per-row factors, the new skeleton block; fills ``prep``'s result fields."""
    work = prep.work
    plan = work.plan

    # ---- B and F of every hidden node (one gather and product), Gamma (one gather and sum)
    torch.prod(work.skel.take(plan.walk_bf), 1, out=work.bf)
    B, F = work.B, work.F_h
    if unit_b is None:  # B is final here: decided once, for the S2 norms and the elementwise form
        unit_b = torch.equal(B, work.ones_h)
    if plan.normalized:
        _normalize_rows(prep, unit_b)
    gamma = work.base.take(plan.walk_g_rows).sum(1)

    # ---- free tau edges: path-space SGD step with the Gamma correction, then the guard.
    # p = g_tau / (B F(next)) - Gamma / v with v = B F and F = w_tau F(next): p = (g_tau w_tau - Gamma) / v
    lr, wd, k_buf, k_d, a_d, a_buf = _tau_coefficients(prep)
    w_tau, g_tau, m_tau = work.skel.take(plan.tau_take).unbind(0)
    v = B * F
    d = torch.addcmul(gamma, g_tau, w_tau, value=-1).div_(v).neg_()
    aux: dict[str, Tensor] | None = None
    if prep.bias_params is not None:  # diagnostics readings requested: keep what they need
        w_sig, g_sig = work.skel.take(plan.sig_take).unbind(0)
        aux = {"v": v, "d0": d.clone(), "tau_sg": g_tau * w_tau / v, "sig_wg": w_sig * g_sig}
        aux["sig_sg"] = aux["sig_wg"] / v
        bias_wg = [b.param.dot(b.grad) for b in prep.biases if b is not None]
        aux["bias_wg"] = torch.stack(bias_wg).sum() if bias_wg else v.new_zeros(())
    if not _is(wd, 0):
        _axpy(d, v, wd)
    buf_tau = None
    direction = d
    if prep.momentum:
        if _is(k_buf, 0):
            buf_tau = d * k_d
        elif _is(k_d, 1) and not isinstance(k_buf, Tensor):
            buf_tau = torch.add(d, m_tau, alpha=k_buf)
        else:
            buf_tau = _axpy(d * k_d, m_tau, k_buf)
        if _is(a_d, 0) and _is(a_buf, 1):
            direction = buf_tau
        else:
            direction = _axpy(d * a_d, buf_tau, a_buf)
    v_new = torch.add(v, direction, alpha=-lr) if not isinstance(lr, Tensor) else v - direction * lr
    ratio = work.ratio
    torch.div(v_new, v, out=ratio)
    hit = torch.ge(ratio, min_ratio).logical_not_().logical_and_(plan.free)
    ratio.masked_fill_(hit, min_ratio)
    # rho = F'/F: the ratio of the first free tau edge downstream; new tau weight w * ratio / rho(next)
    rho = work.rho
    torch.take(work.ratio_ext, plan.first_free, out=rho)
    w_tau_new = (w_tau * ratio).div_(work.rho_ext.take(plan.nxt))
    if aux is not None:
        free = plan.free_nodes
        dv = (v * ratio - v).index_select(0, free).square().sum()
        aux["tau_dv"] = dv
        step = direction * lr
        aux["tau_fix"] = dv - step.index_select(0, free).square().sum()
        prep.tau_aux = aux

    # ---- per-row vectors (the output layers' rows stay 1): q = 1 / F', q2 = 1 / (F F')
    torch.reciprocal(rho, out=work.rhoinv_h)
    torch.reciprocal(work.F, out=work.r)
    torch.mul(work.r, work.rhoinv, out=work.q)
    torch.mul(work.r, work.q, out=work.q2)

    # ---- the new skeleton block: sigma weights unchanged (buffer 0), free tau entries updated
    # (the gathered block is not needed any more: it becomes the block to write back; the buffer
    # block is zero at sigma entries already, as every step leaves the buffers there)
    work.sw.index_copy_(0, plan.free_pos, w_tau_new.index_select(0, plan.free_nodes))
    if buf_tau is not None:
        work.sbuf.index_copy_(0, plan.free_pos, buf_tau.index_select(0, plan.free_nodes))

    # ---- the check: every row vector (B, F, 1/rho, 1/F, 1/F', 1/(F F')), the new skeleton block
    # and the floor 1/F'^2 (the next step's squared preconditioner) finite
    checks = [work.rowblk, work.sw, work.q[: plan.hidden].square()]
    if buf_tau is not None:
        checks.append(work.sbuf)
    prep.factor_check = torch.cat(checks)
    prep.unit_b = unit_b
    prep.hits = hit.sum()
    prep.tau_buf = buf_tau is not None


def _normalize_rows(prep: Prepared, unit_b: bool) -> None:
    """S2 (docs/math.md, "BatchNorm segments: S1 and S2"): divide every row's ``F`` by ``sqrt(n)`` of
    the S2 row where its tau chain ends, so that the rest of the step is G-SGD on the slice ``n = 1``
    (output rows, whose ``F`` is 1, get ``1 / sqrt(n)``). A zero S2 row makes ``F`` infinite: the
    step is skipped, as for a zero tau weight."""
    work = prep.work
    plan = work.plan
    H = plan.hidden
    # with every B at 1 (the skeleton init's gamma = 1, which never moves: a sigma weight) the norms
    # are plain row norms: one read of the weight, no temporary
    for l in plan.normalized:
        w = prep.weights[l].param
        if plan.reads_hidden[l] and not unit_b:
            work.row_norms_(l, w, plan.cols(work.B_ext, l).view(1, -1, 1))
        else:
            torch.linalg.vector_norm(w.view(w.shape[0], -1), dim=1, out=work.n_rows_l[l]).square_()
    q_end = work.n_rows.take(plan.row_end).sqrt_()
    work.F_h.div_(q_end[:H])
    torch.reciprocal(q_end[H:], out=work.F[H:])


def apply_chain(prep: Prepared) -> Tensor:
    """Phase two: write the prepared step into the slots' targets (and buffer targets).

    Args:
        prep: From :func:`prepare_chain`; slot targets (and buffer targets) hold the current values.

    Returns:
        0-d int64 tensor: the number of free tau path values the guard clamped.
    """
    work = prep.work
    plan = work.plan
    bulk(_items(prep, None if prep.unit_b else work.B_ext))
    # index_copy_ on flat views, not put_: put_ has no deterministic mode (use_deterministic_algorithms)
    for l, s in enumerate(prep.weights):
        sel = plan.sel[l]
        if sel.numel():
            s.target.view(-1).index_copy_(0, sel, work.sw_l[l])
            if s.buf_target is not None and prep.tau_buf:
                s.buf_target.view(-1).index_copy_(0, sel, work.sbuf_l[l])
    return prep.hits


def _items(prep: Prepared, B: Tensor | None) -> list[Item]:
    """Slots with their coefficients: views of the work area, plus ``B`` columns when ``B`` is given."""
    work = prep.work
    plan = work.plan
    L = plan.n_layers
    row3, row1 = work.row3, work.row1
    items: list[Item] = []
    for l in range(L):
        rhoinv = row3["rhoinv"][l] if plan.is_hidden[l] else None
        if B is not None and plan.reads_hidden[l]:
            # general form: s = 1 / (F B), an [n_out, n_in, 1] outer product of r and 1 / B
            b = plan.cols(B, l).view(1, -1, 1)
            items.append(Item(prep.weights[l], row3["r"][l], row3["F"][l], rhoinv, b=b))
        else:
            items.append(Item(prep.weights[l], row3["r"][l], row3["F"][l], rhoinv, q=row3["q"][l], q2=row3["q2"][l]))
        bs = prep.biases[l]
        if bs is not None:
            items.append(Item(bs, row1["r"][l], row1["F"][l], row1["rhoinv"][l], q=row1["q"][l], q2=row1["q2"][l]))
    for l, ts in zip(plan.tied_layer, prep.biases[L:]):
        if ts is not None:
            items.append(Item(ts, row1["r"][l], row1["F"][l], row1["rhoinv"][l], q=row1["q"][l], q2=row1["q2"][l]))
    return items
