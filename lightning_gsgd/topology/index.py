"""Sigma/tau basis of a chain as index tensors, and the backbone products ``B``, ``F`` and ``Gamma``.

A chain has layers 1..L with weights seen as ``[n_l, n_{l-1}, taps]``. For every hidden node ``b`` of
layer ``l < L`` the *sigma* edge is ``(b <- b mod n_{l-1})`` at the centre tap; for every hidden node
``a`` of layer ``l - 1`` the *tau* edge is ``(a mod n_l <- a)`` in layer ``l``. With ``B`` the product of
sigma weights from the input to a node and ``F`` the product of tau weights from a node to the output,
the basis-path value of a non-sigma edge ``e = (b <- a)`` is ``v_e = w_e * B(a) * F(b)``; a hidden bias
is an edge from a constant node with ``B = 1`` (docs/math.md, "The sigma/tau basis").

Used by the skeleton initialisation, the diagnostics and the reference step of the tests; every loop
runs over layers, never over units.
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


def sigma_entries(w3: Tensor, idx: LayerIndex) -> Tensor:
    """The sigma entries of a hidden layer, one per output node."""
    assert idx.sig_rows is not None
    return w3[idx.sig_rows, idx.sig_cols, idx.centre]


def tau_entries(w3: Tensor, idx: LayerIndex) -> Tensor:
    """The tau entries of a layer after the first, one per input node."""
    assert idx.tau_rows is not None
    return w3[idx.tau_rows, torch.arange(idx.n_in, device=w3.device), idx.centre]


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
        B.append(sigma_entries(weights[l], idx) * B[l][idx.sig_cols])
    F = [torch.ones(index[-1].n_out, dtype=w0.dtype, device=w0.device)]
    for l in range(n - 1, 0, -1):
        idx = index[l]
        F.insert(0, tau_entries(weights[l], idx) * F[0][idx.tau_rows])
    return B, F


def chain_gamma(
    weights: list[Tensor],
    grads: list[Tensor],
    biases: list[Tensor | None],
    bias_grads: list[Tensor | None],
    index: list[LayerIndex],
) -> list[Tensor]:
    """``Gamma`` of every hidden node: the sum of ``v * dL/dv`` over basis paths that reach it.

    ``Gamma_l[b] = sum_in(w * g) - (w * g)[sigma(b)] + [sigma(b) is tau] * Gamma_{l-1}[src]``, the
    closed form of the inverse chain rule of docs/math.md, "The inverse chain rule" (one row reduction per layer).

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
        gam = row - sigma_entries(w, idx) * sigma_entries(g, idx)
        if prev is not None:
            assert idx.sig_is_tau is not None and idx.sig_cols is not None
            gam = gam + torch.where(idx.sig_is_tau, prev[idx.sig_cols], 0.0)
        gammas.append(gam)
        prev = gam
    return gammas
