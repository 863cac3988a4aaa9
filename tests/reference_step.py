"""The straightforward *reference* form of one G-SGD step on a chain, for the tests.

It computes every basis-path value, path-space gradient and new weight with full-size temporaries
(about 10x the cost of SGD), following docs/math.md step by step: SGD (momentum, dampening,
Nesterov, weight decay, as ``torch.optim.SGD``) on the basis-path values ``v``, with the momentum
buffer in path coordinates, and a map back to weights that keeps every sigma weight fixed. The
library runs the in-place cheap form (:mod:`lightning_gsgd.step.chain_step`);
``tests/test_step_reference.py`` checks that both agree. Nothing in the library imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_gsgd.step.hyper import Hyper
from lightning_gsgd.topology.index import LayerIndex, chain_backbone, chain_gamma, sigma_entries, tau_entries


def _sgd_direction(d: Tensor, buf: Tensor | None, hp: Hyper) -> tuple[Tensor, Tensor | None]:
    """torch.optim.SGD's momentum rule applied to the path-space gradient ``d``."""
    if hp.momentum == 0:
        return d, None
    if buf is None:
        buf = d.clone()
    else:
        buf = buf * hp.momentum + d * (1 - hp.dampening)
    direction = d + hp.momentum * buf if hp.nesterov else buf
    return direction, buf


@dataclass
class ChainStep:
    """New values computed by :func:`gsgd_chain_step` (nothing is written in place there)."""

    weights: list[Tensor]
    biases: list[Tensor | None]
    weight_bufs: list[Tensor | None]
    bias_bufs: list[Tensor | None]
    guard_hits: Tensor


def gsgd_chain_step(
    weights: list[Tensor],
    grads: list[Tensor],
    biases: list[Tensor | None],
    bias_grads: list[Tensor | None],
    weight_bufs: list[Tensor | None],
    bias_bufs: list[Tensor | None],
    index: list[LayerIndex],
    weight_hp: list[Hyper],
    bias_hp: list[Hyper | None],
    min_ratio: float,
) -> ChainStep:
    """One G-SGD step on a chain; returns the new weights, biases and momentum buffers.

    Args:
        weights: ``[n_out, n_in, taps]`` weight views, input to output.
        grads: Matching gradient views.
        biases: Bias per layer (or ``None``).
        bias_grads: Bias gradients per layer (``None`` where there is no bias).
        weight_bufs: Momentum buffers in path coordinates (``None`` before the first step).
        bias_bufs: Same for the biases.
        index: Sigma/tau indices per layer.
        weight_hp: Hyper-parameters of each layer's weight.
        bias_hp: Hyper-parameters of each layer's bias.
        min_ratio: Guard: a free tau path value may shrink to at most ``min_ratio`` times its old
            value per step and never flips sign (a flip would zero or flip the F products and break
            the map back to weights).

    Returns:
        A :class:`ChainStep`; ``guard_hits`` counts the tau paths where the guard acted.
    """
    L = len(weights)
    B, F = chain_backbone(weights, index)
    gamma = chain_gamma(weights, grads, biases, bias_grads, index)
    R = max(idx.row_off + idx.n_out for idx in index)
    F_new: Tensor = torch.ones(R, dtype=weights[0].dtype, device=weights[0].device)  # F' of every row
    new_w: list[Tensor] = [weights[0]] * L
    new_b: list[Tensor | None] = [None] * L
    new_wbuf: list[Tensor | None] = [None] * L
    new_bbuf: list[Tensor | None] = [None] * L
    hits = torch.zeros((), dtype=torch.int64, device=weights[0].device)
    # from the outputs backwards: a layer's rows have their final F' once every layer after it is done
    for l in range(L - 1, -1, -1):
        w, g, idx, hp = weights[l], grads[l], index[l], weight_hp[l]
        bcol = B[l].view(1, -1, 1)
        frow = F[l].view(-1, 1, 1)
        v = w * bcol * frow
        p = g / (bcol * frow)
        if idx.tau_rows is not None:
            # Tau edges also carry every path through their source node: remove that share.
            v_tau = v[idx.tau_rows, idx.tau_cols, idx.centre]
            p[idx.tau_rows, idx.tau_cols, idx.centre] -= gamma[idx.tau_nodes] / v_tau
        d = p + hp.weight_decay * v if hp.weight_decay != 0 else p
        direction, new_wbuf[l] = _sgd_direction(d, weight_bufs[l], hp)
        v_new = v - hp.lr * direction
        if idx.tau_rows is not None:
            assert idx.tau_free is not None
            old = v[idx.tau_rows, idx.tau_cols, idx.centre]
            new = v_new[idx.tau_rows, idx.tau_cols, idx.centre]
            hit = idx.tau_free & ~(new / old >= min_ratio)
            hits = hits + hit.sum()
            v_new[idx.tau_rows, idx.tau_cols, idx.centre] = torch.where(hit, old * min_ratio, new)
        # w' = v' / (B F') written as (w + dv / (B F)) * (F / F'): when nothing moves (lr = 0) this
        # returns w bit for bit, where v' / (B F') would round w * B * F / (B * F).
        f_new = F_new[idx.rows]
        w_new = (w + (v_new - v) / (bcol * frow)) * (frow / f_new.view(-1, 1, 1))
        if idx.sig_rows is not None:
            w_new[idx.sig_rows, idx.sig_cols, idx.centre] = sigma_entries(w, idx)
            buf = new_wbuf[l]
            if buf is not None:
                buf[idx.sig_rows, idx.sig_cols, idx.centre] = 0
        new_w[l] = w_new
        b, gb = biases[l], bias_grads[l]
        if b is not None and gb is not None and idx.hidden:
            bhp = bias_hp[l]
            assert bhp is not None
            vb = b * F[l]
            db = gb / F[l]
            if bhp.weight_decay != 0:
                db = db + bhp.weight_decay * vb
            bdir, new_bbuf[l] = _sgd_direction(db, bias_bufs[l], bhp)
            new_b[l] = (b - bhp.lr * bdir / F[l]) * (F[l] / f_new)
        if idx.tau_rows is not None:
            F_new[idx.tau_nodes] = tau_entries(w_new, idx) * F_new[idx.row_off + idx.tau_rows]
    return ChainStep(new_w, new_b, new_wbuf, new_bbuf, hits)
