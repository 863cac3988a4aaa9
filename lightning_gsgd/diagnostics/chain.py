"""Per-chain building blocks of the invariant-space diagnostics: pure tensor code, no Lightning.

:class:`~lightning_gsgd.diagnostics.metrics.PathDiagnostics` drives these; the definitions of the
quantities are in :mod:`lightning_gsgd.diagnostics.metrics`. Every layer is handled in its flat
``[n_out, n_in * taps]`` layout (the taps of one input node are adjacent), so every elementwise
pass and row reduction is contiguous; sigma and free-tau entries are addressed by precomputed
index pairs (:class:`FlatIndex`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_gsgd.step.slots import ChainReading
from lightning_gsgd.topology.index import LayerIndex, chain_backbone, chain_gamma, chain_index
from lightning_gsgd.topology.types import Chain, ChainLayer


def free_tau_cols(chain: Chain, device: torch.device) -> list[Tensor | None]:
    """Per layer, which of the tau edges it holds are free (skeleton paths), as an int64 index into
    the layer's tau edges (``LayerIndex.tau_nodes`` order).

    Computed on the CPU once (boolean selection on an accelerator would synchronize), then moved.
    ``None`` for a layer that holds no tau edges.
    """
    out: list[Tensor | None] = []
    for idx in chain_index(chain, torch.device("cpu")):
        out.append(None if idx.tau_free is None else torch.nonzero(idx.tau_free).flatten().to(device))
    return out


def _work(t: Tensor) -> Tensor:
    """``t`` in at least float32 (half-precision sums of squares underflow); no copy otherwise."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def chain_tensors(
    chain: Chain, grads: bool = True
) -> tuple[list[Tensor], list[Tensor], list[Tensor | None], list[Tensor | None]]:
    """3-D weights, their gradients (zeros where missing; empty if ``grads`` is false), biases, bias gradients.

    A layer with tied parameters (``ChainLayer.tied``: hidden biases of its nodes too) has its bias and
    them stacked as ``[1 + T, n_out]``; the readings treat every row of that stack as a hidden bias.
    """
    weights = [_work(layer.weight3d().detach()) for layer in chain.layers]
    biases = [None if layer.bias is None else _work(_stacked(layer, lambda p: p.detach())) for layer in chain.layers]
    if not grads:
        return weights, [], biases, []
    wgrads = [
        torch.zeros_like(w) if layer.weight.grad is None else _work(layer.weight3d(layer.weight.grad.detach()))
        for layer, w in zip(chain.layers, weights)
    ]

    def grad(p: Tensor) -> Tensor:
        return torch.zeros_like(p) if p.grad is None else p.grad

    bgrads = [None if b is None else _work(_stacked(layer, grad)) for layer, b in zip(chain.layers, biases)]
    return weights, wgrads, biases, bgrads


def _stacked(layer: ChainLayer, part: Callable[[Tensor], Tensor]) -> Tensor:
    """``part`` of the layer's bias (which it has), or of the bias and the tied parameters, stacked."""
    assert layer.bias is not None
    if not layer.tied:
        return part(layer.bias).detach()
    return torch.stack([part(p).detach() for p in (layer.bias, *layer.tied)])


@dataclass(frozen=True)
class FlatIndex:
    """Sigma and free-tau entries of one layer, addressed in its ``[n_out, n_in * taps]`` flat view.

    Attributes:
        sig: ``(rows, flat columns)`` of the sigma entries, or ``None`` for the output layer.
        tau: ``(rows, flat columns, source nodes)`` of the free tau entries that the layer holds
            (the skeleton paths), or ``None`` where it holds none.
    """

    sig: tuple[Tensor, Tensor] | None
    tau: tuple[Tensor, Tensor, Tensor] | None


def flat_index(chain: Chain, index: list[LayerIndex], tau_cols: list[Tensor | None]) -> list[FlatIndex]:
    """The :class:`FlatIndex` of every layer of ``chain`` (on the index tensors' device)."""
    out = []
    for layer, idx, free in zip(chain.layers, index, tau_cols):
        sig = None
        if idx.sig_rows is not None:
            assert idx.sig_cols is not None
            sig = (idx.sig_rows, idx.sig_cols * layer.taps + idx.centre)
        tau = None
        if free is not None:
            assert idx.tau_rows is not None and idx.tau_cols is not None and idx.tau_nodes is not None
            tau = (idx.tau_rows[free], idx.tau_cols[free] * layer.taps + idx.centre, idx.tau_nodes[free])
        out.append(FlatIndex(sig, tau))
    return out


def _flat(w3: Tensor) -> Tensor:
    """``[n_out, n_in, taps]`` -> ``[n_out, n_in * taps]`` (a view: the taps of an input node are adjacent)."""
    return w3.reshape(w3.shape[0], -1)


def _scale(f: Tensor, b: Tensor, taps: int) -> Tensor:
    """``F(b) * B(a)`` for every entry of a flat layer: ``v = w * _scale(F, B, taps)``."""
    return torch.outer(f, b if taps == 1 else b.repeat_interleave(taps))


def _norm_sq(t: Tensor) -> Tensor:
    return torch.linalg.vector_norm(t).square()


#: Per layer the basis-path values in the flat layout (sigma entries 0), and per layer the hidden
#: bias's values (``None`` for the output layer and layers without a bias).
PathValues = tuple[list[Tensor], list[Tensor | None]]


def read_chain(
    weights: list[Tensor],
    grads: list[Tensor],
    biases: list[Tensor | None],
    bias_grads: list[Tensor | None],
    index: list[LayerIndex],
    flat: list[FlatIndex],
    normalized: tuple[int, ...] = (),
) -> tuple[ChainReading, PathValues]:
    """Path-space norms, skeleton values and imbalance terms of one chain, and its path values.

    With ``v_e = w_e B(a) F(b)`` and, for an edge ``e = (a -> b)`` that is not a tau edge, ``dL/dv_e = g_e /
    (B(a) F(b))`` (docs/math.md, "The sigma/tau basis" and "The inverse chain rule"). A free tau edge also
    carries every path through its source node ``a``: its ``dL/dv`` is ``g_e / (B(a) F(b)) - Gamma(a) / v_e``
    (``Gamma`` from :func:`chain_gamma`), an O(H) correction. A hidden bias gives ``v = bias F(b)`` and
    ``dL/dv = dL/dbias / F(b)``. Sigma entries are not coordinates and are zeroed.

    Cost per layer, in elementwise passes over the weight (flat ``[n_out, n_in * taps]`` layout,
    so every pass is contiguous): one for the path values (kept for the relative update) and one
    reduction of them, one for ``w**2`` and its row and column sums (the unit norms), one for
    ``dL/dv`` and its reduction, the ``w . g`` row reduction inside :func:`chain_gamma`, and an
    ``n_out x n_in`` scale matrix; no host synchronization.

    Args:
        weights: ``[n_out, n_in, taps]`` weights, input to output (float32 or wider).
        grads: Matching ``dL/dw``.
        biases: Bias per layer (or ``None``).
        bias_grads: Bias gradients per layer (``None`` where there is no bias).
        index: Sigma/tau indices per layer (:func:`chain_index`).
        flat: Sigma and free-tau entries per layer (:func:`flat_index`).
        normalized: The chain's S2 layers: the readings are then of the normalized path values (on
            the slice ``n = 1``, invariant under S1 and S2; docs/math.md, "BatchNorm segments: S1 and S2").
    """
    B, F = chain_backbone(weights, index, normalized)
    gamma = chain_gamma(weights, grads, biases, bias_grads, index)
    H = index[0].n_hidden
    grad_sq = torch.zeros((), dtype=weights[0].dtype, device=weights[0].device)
    value_sq = torch.zeros_like(grad_sq)
    skeleton: list[Tensor] = []
    skeleton_nodes: list[Tensor] = []
    vw: list[Tensor] = []
    incoming = torch.zeros(H + 1, dtype=grad_sq.dtype, device=grad_sq.device)
    outgoing = torch.zeros_like(incoming)
    for w3, g3, fi, idx, b, f, bias, gb in zip(weights, grads, flat, index, B, F, biases, bias_grads):
        w, g, taps = _flat(w3), _flat(g3), w3.shape[2]
        scale = _scale(f, b, taps)
        q = g / scale  # dL/dv of the entries that are neither sigma nor free tau
        v = scale.mul_(w)  # two layer-sized buffers per layer (fresh memory is slow to touch on the CPU)
        if fi.sig is not None:
            v[fi.sig] = 0
            q[fi.sig] = 0
        if fi.tau is not None:
            rows, cols, nodes = fi.tau
            v_tau = v[rows, cols]
            q[rows, cols] = q[rows, cols] - gamma[nodes] / v_tau
            skeleton.append(v_tau.abs())
            skeleton_nodes.append(nodes)
        value_sq = value_sq + _norm_sq(v)
        grad_sq = grad_sq + _norm_sq(q)
        vw.append(v)
        w2 = torch.square(w, out=q)
        if idx.reads_hidden:  # columns that hold hidden units: their outgoing weights
            col = w2.sum(0)
            if taps > 1:
                col = col.view(-1, taps).sum(1)
            outgoing.index_add_(0, idx.col_node, col)
        if idx.hidden:
            inc = w2.sum(1)
            if bias is not None:
                inc = inc + (bias.square() if bias.dim() == 1 else bias.square().sum(0))  # tied: stacked
                value_sq = value_sq + _norm_sq(bias * f)
            if gb is not None:
                grad_sq = grad_sq + _norm_sq(gb / f)
            incoming[idx.rows] = inc
    terms = 0.5 * (torch.log(incoming[:H]) - torch.log(outgoing[:H]))
    order = torch.argsort(torch.cat(skeleton_nodes))  # hidden-node order, as the step's readings
    vb = [None if bias is None or not idx.hidden else bias * f for bias, idx, f in zip(biases, index, F)]
    return ChainReading(grad_sq, value_sq, torch.cat(skeleton)[order], terms), (vw, vb)


def update_sq(
    kept: tuple[list[Tensor], list[Tensor | None]],
    weights: list[Tensor],
    biases: list[Tensor | None],
    index: list[LayerIndex],
    flat: list[FlatIndex],
    normalized: tuple[int, ...] = (),
) -> Tensor:
    """``||v_now - v_kept||**2`` over the basis paths of one chain (normalized path values with S2 layers).

    Per layer: the scale matrix, ``v_now`` into it, the difference and one reduction. ``v_now`` is
    rounded exactly as ``kept`` was (a fused ``kept - w * scale`` would not round the product), so
    weights that did not change give exactly 0.
    """
    B, F = chain_backbone(weights, index, normalized)
    total = torch.zeros((), dtype=weights[0].dtype, device=weights[0].device)
    for l, (w3, k, fi) in enumerate(zip(weights, kept[0], flat)):
        d = _scale(F[l], B[l], w3.shape[2]).mul_(_flat(w3)).sub_(k)
        if fi.sig is not None:
            d[fi.sig] = 0
        total = total + _norm_sq(d)
    for l, (b, k) in enumerate(zip(biases, kept[1])):
        if b is not None and k is not None:
            total = total + _norm_sq(b * F[l] - k)
    return total
