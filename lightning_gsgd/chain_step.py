"""The cheap form of the G-SGD step on a chain (gsgd-math.md section 4b), written in place.

For an entry ``e = (a -> b)`` of a layer that is neither a sigma nor a free tau edge, with
``s = 1 / (B(a) F(b))`` and ``rho = F(b) / F'(b)``, the path-space SGD step maps back to

* no momentum: ``w' = rho ((1 - lr wd) w - lr s^2 g)``
* momentum: ``buf' = mu buf + (1 - damp)(s g + wd w / s)`` (``buf' = s g + wd w / s`` on the first
  step), ``w' = rho (w - lr s buf')``
* Nesterov: the same buffer, ``w' = rho ((1 - lr wd) w - lr s^2 g - lr mu s buf')``

that is SGD with an outer-product preconditioner and a per-row rescale. With momentum the passes are
``s g`` into a temporary, ``w / s`` in place, torch's fused SGD kernel on (path values, path
gradient, buffer), and ``* s rho`` back; otherwise a few ``torch._foreach_*`` passes. ``s`` is a
row vector when every ``B`` is 1 (sigma weights at 1, as after
:func:`lightning_gsgd.init_skeleton_`) and an ``[n_out, n_in, 1]`` outer product otherwise. The
momentum buffer stays in path coordinates.

Only the O(H) sigma and free tau entries need more: they are gathered into the chain's skeleton
block (:class:`lightning_gsgd.chain_plan.ChainPlan`), updated there with the Gamma correction of
section 3 and the guard, and written back after the elementwise passes (sigma weights unchanged,
their buffer entries zero). ``Gamma`` needs one row reduction ``sum(w * g)`` per layer; whether
those sums are finite is also the step's non-finite check.

The step has two phases so that it can be skipped before anything is written:
:func:`prepare_chain` (reads only) and :func:`apply_chain` (writes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_gsgd.chain_bulk import Item, bulk
from lightning_gsgd.chain_plan import ChainPlan
from lightning_gsgd.functional import Hyper


@dataclass
class Slot:
    """One chain tensor (a layer's weight or bias) and where its step is written.

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


class ChainWork:
    """Scratch vectors of one chain (O(H) entries) and views into them, reused across steps.

    One flat tensor holds: the skeleton block ``[S, 1, G, M]``; ``B`` followed by the per-row
    vectors ``F``, ``1/F``, ``1/F'``, ``F/F'``, ``1/(F F')`` and ``F'`` (the last layer's rows are
    constant 1); ``X`` (new tau weights, then 1); the per-row sums (then 0); and the new skeleton
    values. Nothing in it is optimizer state: it is rebuilt freely.

    Args:
        plan: The chain's index plan.
        dtype: Parameter dtype.
        device: Parameter device.
    """

    def __init__(self, plan: ChainPlan, dtype: torch.dtype, device: torch.device) -> None:
        self.plan, self.dtype, self.device = plan, dtype, device
        H, n_sel, L = plan.hidden, plan.n_sel, plan.n_layers
        R = H + plan.n_out[-1]
        sizes = [3 * n_sel + 1, H + 6 * R, H + 1, R + 1, 2 * n_sel]
        self.vec = torch.zeros(sum(sizes), dtype=dtype, device=device)
        skel, rowblk, x_ext, base, new = torch.split(self.vec, sizes)
        self.skel = skel
        self.sw = skel[:n_sel]
        self.sg = skel[n_sel + 1 : 2 * n_sel + 1]
        self.sbuf = skel[2 * n_sel + 1 :]
        skel[n_sel] = 1
        self.bf = rowblk[: 2 * H]
        self.B = rowblk[:H]
        f, r, q, rho, q2, fn = (rowblk[H + k * R : H + (k + 1) * R] for k in range(6))
        self.F, self.R, self.Q, self.RHO, self.Q2, self.FN = f, r, q, rho, q2, fn
        for v in (f, r, q, rho, q2, fn):
            v[H:] = 1
        self.x_ext = x_ext
        x_ext[H] = 1
        self.base = base  # base[R] stays 0 (padding of walk_g_rows)
        self.nsw, self.nsbuf = new[:n_sel], new[n_sel:]
        starts = [plan.hoff[l] if l < L - 1 else H for l in range(L)]
        self.rows: list[slice] = [slice(a, a + plan.n_out[l]) for l, a in enumerate(starts)]
        offs = [0]
        for s in plan.sel:
            offs.append(offs[-1] + s.numel())
        self.sel_slices = [slice(offs[l], offs[l + 1]) for l in range(L)]
        # per-layer [n_out, 1, 1] and [n_out] views of the per-row vectors
        self.row3 = {k: [v[sl].view(-1, 1, 1) for sl in self.rows] for k, v in self._row_vectors().items()}
        self.row1 = {k: [v[sl] for sl in self.rows] for k, v in self._row_vectors().items()}
        self.base_rows = [base[sl] for sl in self.rows]
        self.sw_l = [self.sw[sl] for sl in self.sel_slices]
        self.sg_l = [self.sg[sl] for sl in self.sel_slices]
        self.sbuf_l = [self.sbuf[sl] for sl in self.sel_slices]
        self.nsw_l = [self.nsw[sl] for sl in self.sel_slices]
        self.nsbuf_l = [self.nsbuf[sl] for sl in self.sel_slices]
        self.ones_h = torch.ones(H, dtype=dtype, device=device)

    def _row_vectors(self) -> dict[str, Tensor]:
        return {"F": self.F, "R": self.R, "Q": self.Q, "RHO": self.RHO, "Q2": self.Q2}

    def fits(self, plan: ChainPlan, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether this work area belongs to ``plan`` and matches the parameters' dtype and device."""
        return self.plan is plan and self.dtype == dtype and self.device == device

    def nbytes(self) -> int:
        """Memory held by the scratch vector."""
        return self.vec.numel() * self.vec.element_size()


@dataclass
class Prepared:
    """A chain after :func:`prepare_chain`: its slots, and the skeleton block and sums filled in.

    Attributes:
        work: The chain's work area (holds the gathered values).
        weights: One :class:`Slot` per layer weight.
        biases: One :class:`Slot` (or ``None``) per layer bias.
        momentum: Whether any weight has momentum (the buffer block was gathered).
        scratch: Per layer, the ``w * g`` product, reused as scratch by the step.
    """

    work: ChainWork
    weights: list[Slot]
    biases: list[Slot | None]
    momentum: bool
    scratch: list[Tensor] = field(default_factory=list)

    def slots(self) -> list[Slot]:
        """Every weight and bias slot."""
        return [*self.weights, *(b for b in self.biases if b is not None)]

    def sums(self) -> Tensor:
        """Per-row sums ``sum(w * g)`` (bias included) of every layer: finite iff the step can run."""
        return self.work.base[:-1]


def prepare_chain(work: ChainWork, weights: list[Slot], biases: list[Slot | None]) -> Prepared:
    """Gather the skeleton entries and the per-row sums ``sum(w * g)`` of a chain (no writes).

    Args:
        work: Work area of the chain.
        weights: Per layer, the weight slot (``[n_out, n_in, taps]`` views).
        biases: Per layer, the bias slot or ``None`` (no bias, or a bias without gradient).
    """
    plan = work.plan
    momentum = any(s.hp.momentum != 0 for s in weights)
    scratch = []
    for l, s in enumerate(weights):
        sel = plan.sel[l]
        torch.take(s.param, sel, out=work.sw_l[l])
        torch.take(s.grad, sel, out=work.sg_l[l])
        if momentum:
            if s.buf is not None:
                torch.take(s.buf, sel, out=work.sbuf_l[l])
            else:
                work.sbuf_l[l].zero_()
        prod = torch.mul(s.param, s.grad)
        torch.sum(prod.view(prod.shape[0], -1), 1, out=work.base_rows[l])
        scratch.append(prod)
        b = biases[l]
        if b is not None:
            work.base_rows[l].addcmul_(b.param, b.grad)
    sig = work.skel.take(plan.sig_take)
    work.base[: plan.hidden].addcmul_(sig[0], sig[1], value=-1)
    return Prepared(work, list(weights), list(biases), momentum, scratch)


def _key(s: Slot) -> tuple:
    """Hyper-parameters of a slot, comparable without reading tensor values (tensor lr: by identity)."""
    hp = s.hp
    lr = ("tensor", id(hp.lr)) if isinstance(hp.lr, Tensor) else hp.lr
    return lr, hp.momentum, hp.dampening, hp.weight_decay, hp.nesterov, s.buf is None


def _tau_row(s: Slot) -> tuple:
    """``(lr, wd, k_buf, k_d, a_d, a_buf)``: ``buf' = k_buf buf + k_d d``, ``dir = a_d d + a_buf buf'``."""
    hp = s.hp
    mu = hp.momentum
    if mu == 0:
        return hp.lr, hp.weight_decay, 0.0, 0.0, 1.0, 0.0
    k_buf, k_d = (mu, 1.0 - hp.dampening) if s.buf is not None else (0.0, 1.0)
    a_d, a_buf = (1.0, mu) if hp.nesterov else (0.0, 1.0)
    return hp.lr, hp.weight_decay, k_buf, k_d, a_d, a_buf


def _tau_coefficients(prep: Prepared) -> tuple:
    """Per-tau-entry coefficients (:func:`_tau_row`): scalars if all tau layers agree, else ``[H]`` vectors."""
    slots = prep.weights[1:]
    if all(_key(s) == _key(slots[0]) for s in slots[1:]):
        return _tau_row(slots[0])
    plan, work = prep.work.plan, prep.work
    table = torch.zeros((plan.n_layers, 6), dtype=work.dtype, device=work.device)
    for l, s in enumerate(slots, start=1):
        for k, val in enumerate(_tau_row(s)):
            if isinstance(val, Tensor):
                table[l, k].copy_(val)
            elif val != 0:
                table[l, k].fill_(val)
    per = table.index_select(0, plan.tau_layer)
    return tuple(per[:, k] for k in range(6))


def _is(x: float | Tensor, value: float) -> bool:
    return not isinstance(x, Tensor) and x == value


def apply_chain(prep: Prepared, min_ratio: float, *, unit_b: bool | None) -> Tensor:
    """Compute the step of a prepared chain and write it into the slots' targets.

    Args:
        prep: From :func:`prepare_chain`; slot targets hold the current values.
        min_ratio: Guard of free tau path values (see :class:`lightning_gsgd.GSGD`).
        unit_b: Whether every ``B`` is known to be 1 (row-only scaling). ``None``: find out by
            reading the values (a host read: CPU only); ``False``: use the general form.

    Returns:
        0-d int64 tensor: the number of free tau path values the guard clamped.
    """
    work = prep.work
    plan = work.plan
    H = plan.hidden

    # ---- chain vectors over hidden nodes: B and F (one gather), Gamma
    torch.prod(work.skel.take(plan.walk_bf), 1, out=work.bf)
    B, F = work.B, work.F[:H]
    gamma = work.base.take(plan.walk_g_rows).sum(1)

    # ---- free tau entries: path-space SGD with the Gamma correction, then the guard.
    # p = g_tau / (B F(next)) - Gamma / v with v = B F and F = w_tau F(next): p = (g_tau w_tau - Gamma) / v
    lr, wd, k_buf, k_d, a_d, a_buf = _tau_coefficients(prep)
    tau = work.skel.take(plan.tau_take)
    w_tau, g_tau, m_tau = tau[0], tau[1], tau[2]
    v = B * F
    d = torch.addcmul(gamma, g_tau, w_tau, value=-1).div_(v).neg_()
    if not _is(wd, 0):
        d = d.addcmul_(v, wd) if isinstance(wd, Tensor) else d.add_(v, alpha=wd)
    buf_tau = None
    direction = d
    if prep.momentum:
        buf_tau = d * k_d
        if not _is(k_buf, 0):
            buf_tau.addcmul_(m_tau, k_buf) if isinstance(k_buf, Tensor) else buf_tau.add_(m_tau, alpha=k_buf)
        if _is(a_d, 0) and _is(a_buf, 1):
            direction = buf_tau
        else:
            direction = d * a_d + buf_tau * a_buf
    v_new = torch.add(v, direction, alpha=-lr) if isinstance(lr, float) else v - direction * lr
    hit = torch.ge(v_new / v, min_ratio).logical_not_().logical_and_(plan.free)
    v_new = torch.where(hit, v * min_ratio, v_new)
    x = work.x_ext[:H]
    torch.where(plan.free, v_new / B, w_tau, out=x)
    torch.prod(work.x_ext.take(plan.walk_n), 1, out=work.FN[:H])
    w_tau_new = x / work.FN.index_select(0, plan.nxt)

    # ---- per-row vectors (the last layer's rows stay 1)
    torch.reciprocal(work.F, out=work.R)
    torch.reciprocal(work.FN, out=work.Q)
    torch.mul(work.F, work.Q, out=work.RHO)
    torch.mul(work.R, work.Q, out=work.Q2)
    if unit_b is None:
        unit_b = torch.equal(B, work.ones_h)
    items = _items(prep, None if unit_b else B)
    bulk(items)

    # ---- skeleton entries: sigma weights unchanged (buffer 0), free tau entries updated
    work.nsw.copy_(work.sw).index_copy_(0, plan.free_pos, w_tau_new.index_select(0, plan.free_nodes))
    if buf_tau is not None:
        work.nsbuf.zero_().index_copy_(0, plan.free_pos, buf_tau.index_select(0, plan.free_nodes))
    for l, s in enumerate(prep.weights):
        sel = plan.sel[l]
        if sel.numel():
            s.target.put_(sel, work.nsw_l[l])
            if s.buf_target is not None and buf_tau is not None:
                s.buf_target.put_(sel, work.nsbuf_l[l])
    return hit.sum()


def _items(prep: Prepared, B: Tensor | None) -> list[Item]:
    """Slots with their coefficient tensors (views of the work area when ``B`` is ``None``, i.e. 1)."""
    work = prep.work
    plan = work.plan
    L = plan.n_layers
    items: list[Item] = []
    for l in range(L):
        r3, f3, q3 = work.row3["R"][l], work.row3["F"][l], work.row3["Q"][l]
        rho3 = work.row3["RHO"][l] if l < L - 1 else None
        q23 = work.row3["Q2"][l]
        if B is not None and l > 0:
            b = B[plan.hoff[l - 1] : plan.hoff[l - 1] + plan.n_out[l - 1]].view(1, -1, 1)
            c = b.reciprocal()
            r3, f3, q3, q23 = r3 * c, f3 * b, q3 * c, q23 * (c * c)
        items.append(Item(prep.weights[l], r3, f3, q3, q23, rho3, prep.scratch[l]))
        bs = prep.biases[l]
        if bs is not None:
            row1 = work.row1
            rho1 = row1["RHO"][l] if l < L - 1 else None
            items.append(Item(bs, row1["R"][l], row1["F"][l], row1["Q"][l], row1["Q2"][l], rho1, None))
    return items
