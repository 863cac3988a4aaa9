"""The G-SGD step as pure tensor functions (no Lightning, no optimizer state handling).

Notation follows ``shared/design/gsgd-math.md``. A chain has layers 1..L with weights seen as
``[n_l, n_{l-1}, taps]``. For every hidden node ``b`` of layer ``l < L`` the *sigma* edge is
``(b <- b mod n_{l-1})`` at the centre tap; for every hidden node ``a`` of layer ``l - 1`` the *tau*
edge is ``(a mod n_l <- a)`` in layer ``l``. With ``B`` the product of sigma weights from the input
to a node and ``F`` the product of tau weights from a node to the output, the basis-path value of a
non-sigma edge ``e = (b <- a)`` is ``v_e = w_e * B(a) * F(b)``; a hidden bias is an edge from a
constant node with ``B = 1``.

The step is SGD (momentum, dampening, Nesterov, weight decay, as ``torch.optim.SGD``) on the
basis-path values ``v``, with the momentum buffer kept in path coordinates, and a map back to
weights that keeps every sigma weight fixed. Every loop below runs over layers, never over units.

:func:`gsgd_chain_step` is the straightforward *reference* form (full-size masks and temporaries,
about 10x the cost of SGD). :class:`lightning_gsgd.GSGD` runs the in-place cheap form of section 4b
(:mod:`lightning_gsgd.chain_step`); ``tests/test_step_reference.py`` checks that both agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LayerIndex:
    """Index tensors of the sigma and tau edges of one layer (on the parameters' device).

    Attributes:
        n_out: Output nodes of the layer.
        n_in: Input nodes of the layer.
        centre: The tap that carries sigma and tau edges.
        sig_rows: Rows of the sigma edges (hidden layers only, else ``None``).
        sig_cols: Columns of the sigma edges.
        tau_rows: Rows of the tau edges of the previous layer's hidden nodes (layers after the
            first only, else ``None``); column ``a`` holds the tau edge of input node ``a``.
        tau_free: For each tau edge, whether it is not also a sigma edge (so it is a free
            coordinate that the step updates).
        sig_is_tau: For each sigma edge, whether it is also the tau edge of its source node.
    """

    n_out: int
    n_in: int
    centre: int
    sig_rows: Tensor | None
    sig_cols: Tensor | None
    tau_rows: Tensor | None
    tau_free: Tensor | None
    sig_is_tau: Tensor | None


def build_layer_index(
    n_out: int, n_in: int, centre: int, *, hidden_out: bool, hidden_in: bool, device: torch.device
) -> LayerIndex:
    """Precompute the sigma/tau index tensors of a layer.

    Args:
        n_out: Output nodes of the layer.
        n_in: Input nodes of the layer.
        centre: Tap index of the sigma/tau edges.
        hidden_out: Whether the layer's outputs are hidden nodes (all layers but the last).
        hidden_in: Whether the layer's inputs are hidden nodes (all layers but the first).
        device: Where the index tensors live.
    """
    sig_rows = sig_cols = tau_rows = tau_free = sig_is_tau = None
    if hidden_out:
        sig_rows = torch.arange(n_out, device=device)
        sig_cols = sig_rows % n_in
    if hidden_in:
        cols = torch.arange(n_in, device=device)
        tau_rows = cols % n_out
        # The tau edge of input node a is (a mod n_out <- a); it is also sigma of its row b
        # exactly when a == b mod n_in (only possible when the outputs are hidden).
        tau_free = torch.ones(n_in, dtype=torch.bool, device=device)
        if hidden_out:
            tau_free = cols != (tau_rows % n_in)
    if hidden_out and hidden_in:
        assert sig_rows is not None and sig_cols is not None
        sig_is_tau = (sig_cols % n_out) == sig_rows
    return LayerIndex(n_out, n_in, centre, sig_rows, sig_cols, tau_rows, tau_free, sig_is_tau)


def _sigma(w3: Tensor, idx: LayerIndex) -> Tensor:
    assert idx.sig_rows is not None
    return w3[idx.sig_rows, idx.sig_cols, idx.centre]


def _tau(w3: Tensor, idx: LayerIndex) -> Tensor:
    assert idx.tau_rows is not None
    return w3[idx.tau_rows, torch.arange(idx.n_in, device=w3.device), idx.centre]


def _tau_cols(idx: LayerIndex, device: torch.device) -> Tensor:
    return torch.arange(idx.n_in, device=device)


def chain_backbone(weights: list[Tensor], index: list[LayerIndex]) -> tuple[list[Tensor], list[Tensor]]:
    """The sigma-chain products ``B`` and tau-chain products ``F`` of every node.

    Args:
        weights: The layers' weights as ``[n_out, n_in, taps]`` views, input to output.
        index: The layers' sigma/tau indices.

    Returns:
        ``(B, F)``: ``B[l]`` holds B of the input nodes of layer ``l`` (ones for the first layer),
        ``F[l]`` holds F of the output nodes of layer ``l`` (ones for the last layer).
    """
    n = len(weights)
    w0 = weights[0]
    B = [torch.ones(index[0].n_in, dtype=w0.dtype, device=w0.device)]
    for l in range(n - 1):
        idx = index[l]
        B.append(_sigma(weights[l], idx) * B[l][idx.sig_cols])
    F = [torch.ones(index[-1].n_out, dtype=w0.dtype, device=w0.device)]
    for l in range(n - 1, 0, -1):
        idx = index[l]
        F.insert(0, _tau(weights[l], idx) * F[0][idx.tau_rows])
    return B, F


def chain_path_values(
    weights: list[Tensor], biases: list[Tensor | None], index: list[LayerIndex]
) -> tuple[list[Tensor], list[Tensor | None]]:
    """Basis-path values ``v = w * B(a) * F(b)`` of every weight entry and hidden bias.

    Sigma entries are returned too (their value is not a coordinate); use
    :func:`free_mask` to select the basis paths. The output layer's bias is returned as is.
    """
    B, F = chain_backbone(weights, index)
    vw = [w * B[l].view(1, -1, 1) * F[l].view(-1, 1, 1) for l, w in enumerate(weights)]
    vb = [None if b is None else b * F[l] for l, b in enumerate(biases)]
    return vw, vb


def free_mask(w3: Tensor, idx: LayerIndex) -> Tensor:
    """Boolean ``[n_out, n_in, taps]`` mask of the entries that are basis-path coordinates."""
    mask = torch.ones_like(w3, dtype=torch.bool)
    if idx.sig_rows is not None:
        mask[idx.sig_rows, idx.sig_cols, idx.centre] = False
    return mask


def chain_gamma(
    weights: list[Tensor],
    grads: list[Tensor],
    biases: list[Tensor | None],
    bias_grads: list[Tensor | None],
    index: list[LayerIndex],
) -> list[Tensor]:
    """``Gamma`` of every hidden node: the sum of ``v * dL/dv`` over basis paths that reach it.

    ``Gamma_l[b] = sum_in(w * g) - (w * g)[sigma(b)] + [sigma(b) is tau] * Gamma_{l-1}[src]``, the
    closed form of the inverse chain rule of gsgd-math.md section 3 (one row reduction per layer).

    Returns:
        One tensor per hidden layer (layers 1..L-1), ``[n_l]``.
    """
    gammas: list[Tensor] = []
    prev: Tensor | None = None
    for l in range(len(weights) - 1):
        w, g, idx = weights[l], grads[l], index[l]
        row = torch.linalg.vecdot(w.flatten(1), g.flatten(1))
        b, gb = biases[l], bias_grads[l]
        if b is not None and gb is not None:
            row = row + b * gb
        gam = row - _sigma(w, idx) * _sigma(g, idx)
        if prev is not None:
            assert idx.sig_is_tau is not None and idx.sig_cols is not None
            gam = gam + torch.where(idx.sig_is_tau, prev[idx.sig_cols], 0.0)
        gammas.append(gam)
        prev = gam
    return gammas


@dataclass(frozen=True)
class Hyper:
    """SGD hyper-parameters of one layer (taken from its parameter group)."""

    lr: float | Tensor
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool


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
    gammas = chain_gamma(weights, grads, biases, bias_grads, index)
    F_new: Tensor = torch.ones_like(F[-1])
    new_w: list[Tensor] = [weights[0]] * L
    new_b: list[Tensor | None] = [None] * L
    new_wbuf: list[Tensor | None] = [None] * L
    new_bbuf: list[Tensor | None] = [None] * L
    hits = torch.zeros((), dtype=torch.int64, device=weights[0].device)
    for l in range(L - 1, -1, -1):
        w, g, idx, hp = weights[l], grads[l], index[l], weight_hp[l]
        bcol = B[l].view(1, -1, 1)
        frow = F[l].view(-1, 1, 1)
        v = w * bcol * frow
        p = g / (bcol * frow)
        if idx.tau_rows is not None:
            # Tau edges also carry every path through their source node: remove that share.
            cols = _tau_cols(idx, w.device)
            v_tau = v[idx.tau_rows, cols, idx.centre]
            p[idx.tau_rows, cols, idx.centre] -= gammas[l - 1] / v_tau
        d = p + hp.weight_decay * v if hp.weight_decay != 0 else p
        direction, new_wbuf[l] = _sgd_direction(d, weight_bufs[l], hp)
        v_new = v - hp.lr * direction
        if idx.tau_rows is not None:
            assert idx.tau_free is not None
            cols = _tau_cols(idx, w.device)
            old = v[idx.tau_rows, cols, idx.centre]
            new = v_new[idx.tau_rows, cols, idx.centre]
            hit = idx.tau_free & ~(new / old >= min_ratio)
            hits = hits + hit.sum()
            v_new[idx.tau_rows, cols, idx.centre] = torch.where(hit, old * min_ratio, new)
        # w' = v' / (B F') written as (w + dv / (B F)) * (F / F'): when nothing moves (lr = 0) this
        # returns w bit for bit, where v' / (B F') would round w * B * F / (B * F).
        w_new = (w + (v_new - v) / (bcol * frow)) * (frow / F_new.view(-1, 1, 1))
        if idx.sig_rows is not None:
            w_new[idx.sig_rows, idx.sig_cols, idx.centre] = _sigma(w, idx)
            buf = new_wbuf[l]
            if buf is not None:
                buf[idx.sig_rows, idx.sig_cols, idx.centre] = 0
        new_w[l] = w_new
        b, gb = biases[l], bias_grads[l]
        if b is not None and gb is not None:
            bhp = bias_hp[l]
            assert bhp is not None
            vb = b * F[l]
            db = gb / F[l]
            if bhp.weight_decay != 0:
                db = db + bhp.weight_decay * vb
            bdir, new_bbuf[l] = _sgd_direction(db, bias_bufs[l], bhp)
            new_b[l] = (b - bhp.lr * bdir / F[l]) * (F[l] / F_new)
        if l > 0:
            F_new = _tau(w_new, idx) * F_new[idx.tau_rows]
    return ChainStep(new_w, new_b, new_wbuf, new_bbuf, hits)
