"""Sigma/tau basis of a chain as index tensors, and the backbone products ``B``, ``F`` and ``Gamma``.

A chain's layers are seen as ``[n_out, n_in, taps]``; layer ``l`` reads its ``n_in`` input nodes
from earlier layers or from outside the chain (``Chain.sources``). Hidden nodes (the outputs of
layers that another chain layer reads) are numbered ``0 .. H-1`` in layer order; the rows of the
output layers follow at ``H .. R-1`` (the *row* numbering). Node ``H`` stands for every node outside
the chain (``B = 1``, no tau edge).

The basis (docs/math.md, "The sigma/tau basis" and "DAG chains"):

* sigma: for every row ``b`` of a hidden layer, the edge from its input column ``b mod n_in``, at
  the centre tap;
* tau: for every hidden node ``a``, one outgoing edge: in the first layer (in chain order) that
  reads ``a``, from the first column that holds ``a``, to row ``column mod n_out``, at the centre
  tap. In a sequence chain this is the edge ``(a mod n_l <- a)`` of the next layer.

With ``B`` the product of sigma weights from the chain's input to a node and ``F`` the product of
tau weights from a node to an output, the basis-path value of a non-sigma edge ``e = (b <- a)`` is
``v_e = w_e * B(a) * F(b)``; a hidden bias is an edge from a constant node with ``B = 1``.

Used by the skeleton initialisation, the step's plan, the diagnostics and the reference step of the
tests; every loop runs over layers, never over units.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_gsgd.topology.types import Chain


@dataclass(frozen=True)
class LayerIndex:
    """Index tensors of the sigma and tau edges of one chain layer (on the parameters' device).

    Attributes:
        n_out: Output nodes of the layer.
        n_in: Input nodes of the layer.
        centre: The tap that carries sigma and tau edges.
        hidden: Whether the layer's outputs are hidden nodes.
        row_off: Offset of the layer's rows in the row numbering.
        n_hidden: Hidden nodes ``H`` of the whole chain.
        col_node: ``[n_in]`` the hidden node each input column holds (``H``: from outside the chain).
        reads_hidden: Whether some input column holds a hidden node.
        col_range: ``(start, stop)`` when ``col_node`` is ``arange(start, stop)`` (a slice of the
            hidden numbering), else ``None``.
        sig_rows: Rows of the sigma edges (hidden layers only, else ``None``).
        sig_cols: Columns of the sigma edges.
        sig_src: Source node of each sigma edge (``H``: from outside the chain).
        sig_is_tau: For each sigma edge, whether it is also the tau edge of its source node.
        tau_rows: Rows of the tau edges that this layer holds (``None`` if it holds none).
        tau_cols: Their columns (increasing).
        tau_nodes: Their source nodes (hidden numbering).
        tau_free: For each, whether it is not also a sigma edge (a free coordinate).
    """

    n_out: int
    n_in: int
    centre: int
    hidden: bool
    row_off: int
    n_hidden: int
    col_node: Tensor
    reads_hidden: bool
    col_range: tuple[int, int] | None
    sig_rows: Tensor | None
    sig_cols: Tensor | None
    sig_src: Tensor | None
    sig_is_tau: Tensor | None
    tau_rows: Tensor | None
    tau_cols: Tensor | None
    tau_nodes: Tensor | None
    tau_free: Tensor | None

    @property
    def rows(self) -> slice:
        """The layer's rows in the row numbering."""
        return slice(self.row_off, self.row_off + self.n_out)


def chain_rows(chain: Chain) -> tuple[list[int], int, int]:
    """Row offset of every layer, ``H`` and ``R`` (hidden layers first, in layer order)."""
    off = [0] * len(chain.layers)
    at = 0
    for l, layer in enumerate(chain.layers):
        if chain.hidden[l]:
            off[l], at = at, at + layer.n_out
    H = at
    for l, layer in enumerate(chain.layers):
        if not chain.hidden[l]:
            off[l], at = at, at + layer.n_out
    return off, H, at


def chain_index(chain: Chain, device: torch.device | None = None) -> list[LayerIndex]:
    """The :class:`LayerIndex` of every layer of ``chain``.

    Args:
        chain: The chain (only its layers' shapes, centre taps and sources are read).
        device: Where the index tensors live (default: the first layer's weight's device).
    """
    if device is None:
        device = chain.layers[0].weight.device
    layers = chain.layers
    off, H, _ = chain_rows(chain)
    long = dict(dtype=torch.long)
    col_node: list[Tensor] = []
    col_range: list[tuple[int, int] | None] = []
    for srcs in chain.sources:
        parts = [
            torch.full((len(s.nodes),), H, **long) if s.layer < 0 else off[s.layer] + torch.tensor(s.nodes, **long)
            for s in srcs
        ]
        cn = torch.cat(parts)
        col_node.append(cn)
        rng = None
        if len(srcs) == 1 and srcs[0].layer >= 0 and srcs[0].nodes.step == 1:
            start = off[srcs[0].layer] + srcs[0].nodes.start
            rng = (start, start + len(srcs[0].nodes))
        col_range.append(rng)
    # tau edge of each hidden node: the first column that holds it, in the first layer that reads it
    tau_layer = torch.full((H,), -1, **long)
    tau_col = torch.full((H,), -1, **long)
    for l in range(len(layers) - 1, -1, -1):
        cn = col_node[l]
        inside = cn < H
        if not bool(inside.any()):
            continue
        first = torch.full((H,), layers[l].n_in, **long)
        first.scatter_reduce_(0, cn[inside], torch.arange(layers[l].n_in)[inside], "amin")
        here = first < layers[l].n_in
        tau_layer[here] = l
        tau_col[here] = first[here]
    tau_row = torch.full((H,), -1, **long)
    for l, layer in enumerate(layers):
        m = tau_layer == l
        tau_row[m] = tau_col[m] % layer.n_out
    out: list[LayerIndex] = []
    for l, layer in enumerate(layers):
        n_out, n_in = layer.n_out, layer.n_in
        sig_rows = sig_cols = sig_src = sig_is_tau = None
        if chain.hidden[l]:
            sig_rows = torch.arange(n_out)
            sig_cols = sig_rows % n_in
            sig_src = col_node[l][sig_cols]
            src_ok = sig_src < H
            safe = torch.where(src_ok, sig_src, 0)
            sig_is_tau = src_ok & (tau_layer[safe] == l) & (tau_col[safe] == sig_cols) & (tau_row[safe] == sig_rows)
        tau_rows = tau_cols = tau_nodes = tau_free = None
        nodes = torch.nonzero(tau_layer == l).flatten()
        if nodes.numel():
            order = torch.argsort(tau_col[nodes])
            tau_nodes = nodes[order]
            tau_cols = tau_col[tau_nodes]
            tau_rows = tau_row[tau_nodes]
            # a tau edge is no coordinate when it is also the sigma edge of its row
            tau_free = ~torch.as_tensor(chain.hidden[l]) | (tau_cols != tau_rows % n_in)
        t = [sig_rows, sig_cols, sig_src, sig_is_tau, tau_rows, tau_cols, tau_nodes, tau_free]
        t = [None if x is None else x.to(device) for x in t]
        cn = col_node[l].to(device)
        reads = any(src.layer >= 0 for src in chain.sources[l])
        out.append(LayerIndex(n_out, n_in, layer.centre, chain.hidden[l], off[l], H, cn, reads, col_range[l], *t))
    return out


def sigma_entries(w3: Tensor, idx: LayerIndex) -> Tensor:
    """The sigma entries of a hidden layer, one per output node."""
    assert idx.sig_rows is not None
    return w3[idx.sig_rows, idx.sig_cols, idx.centre]


def tau_entries(w3: Tensor, idx: LayerIndex) -> Tensor:
    """The tau entries this layer holds, in the order of ``idx.tau_nodes``."""
    assert idx.tau_rows is not None
    return w3[idx.tau_rows, idx.tau_cols, idx.centre]


def columns(node_values: Tensor, idx: LayerIndex) -> Tensor:
    """Per input column of the layer, the value of the node it holds (``node_values`` has ``H + 1``
    entries, the last one for nodes outside the chain); a view when the columns are a slice."""
    if idx.col_range is not None:
        return node_values[idx.col_range[0] : idx.col_range[1]]
    return node_values[idx.col_node]


def chain_backbone(
    weights: list[Tensor], index: list[LayerIndex], normalized: tuple[int, ...] = ()
) -> tuple[list[Tensor], list[Tensor]]:
    """The sigma-chain products ``B`` and tau-chain products ``F`` of every node.

    Args:
        weights: The layers' weights as ``[n_out, n_in, taps]`` views, in chain order.
        index: The layers' sigma/tau indices (:func:`chain_index`).
        normalized: The chain's S2 layers (``Chain.normalized``): then every row's ``F`` is divided by
            ``sqrt(n)`` of its end row (:func:`normalized_row_norms`), so that ``w B F`` are the
            *normalized* path values, the coordinates on the slice ``n = 1``.

    Returns:
        ``(B, F)``: ``B[l]`` holds B of the input columns of layer ``l`` (1 for columns from outside
        the chain), ``F[l]`` holds F of the output nodes of layer ``l`` (1 on output layers).
    """
    w0 = weights[0]
    H = index[0].n_hidden
    R = max(idx.row_off + idx.n_out for idx in index)
    b_nodes = torch.ones(H + 1, dtype=w0.dtype, device=w0.device)
    for w, idx in zip(weights, index):
        if idx.hidden:
            assert idx.sig_src is not None
            b_nodes[idx.rows] = sigma_entries(w, idx) * b_nodes[idx.sig_src]
    f_rows = torch.ones(R, dtype=w0.dtype, device=w0.device)
    for w, idx in zip(reversed(weights), reversed(index)):
        if idx.tau_rows is not None:
            f_rows[idx.tau_nodes] = tau_entries(w, idx) * f_rows[idx.row_off + idx.tau_rows]
    B = [columns(b_nodes, idx) for idx in index]
    if normalized:
        f_rows = f_rows / normalized_row_norms(weights, B, index, normalized).sqrt()
    F = [f_rows[idx.rows] for idx in index]
    return B, F


def chain_gamma(
    weights: list[Tensor],
    grads: list[Tensor],
    biases: list[Tensor | None],
    bias_grads: list[Tensor | None],
    index: list[LayerIndex],
) -> Tensor:
    """``Gamma`` of every hidden node: the sum of ``v * dL/dv`` over basis paths that reach it.

    ``Gamma[b] = sum_in(w * g) - (w * g)[sigma(b)] + [sigma(b) is tau] * Gamma[source of sigma(b)]``,
    the closed form of the inverse chain rule of docs/math.md, "The inverse chain rule" (one row
    reduction per hidden layer, in chain order).

    A layer's bias may be ``[1 + T, n_out]``: its bias and its tied parameters (``ChainLayer.tied``,
    hidden biases of the same nodes) stacked, as :func:`lightning_gsgd.diagnostics.chain.chain_tensors`
    gives them; every row's ``x * dL/dx`` adds to the row sums.

    Returns:
        ``[H + 1]``: Gamma of every hidden node, then a 0 (nodes outside the chain).
    """
    w0 = weights[0]
    gamma = torch.zeros(index[0].n_hidden + 1, dtype=w0.dtype, device=w0.device)
    for w, g, b, gb, idx in zip(weights, grads, biases, bias_grads, index):
        if not idx.hidden:
            continue
        row = torch.linalg.vecdot(w.flatten(1), g.flatten(1))
        if b is not None and gb is not None:
            row = row + (b * gb if b.dim() == 1 else (b * gb).sum(0))  # 2-D: a bias and tied ones, stacked
        gam = row - sigma_entries(w, idx) * sigma_entries(g, idx)
        assert idx.sig_is_tau is not None and idx.sig_src is not None
        gamma[idx.rows] = gam + torch.where(idx.sig_is_tau, gamma[idx.sig_src], 0.0)
    return gamma


def row_ends(index: list[LayerIndex]) -> Tensor:
    """Per row of the chain (hidden nodes, then the output layers' rows): the output row where its tau
    chain ends (an output row ends at itself). One reverse walk over the tau edges, like ``F``."""
    R = max(idx.row_off + idx.n_out for idx in index)
    end = torch.arange(R, device=index[0].col_node.device)
    for idx in reversed(index):
        if idx.tau_rows is not None:
            end[idx.tau_nodes] = end[idx.row_off + idx.tau_rows]
    return end


def normalized_row_norms(
    weights: list[Tensor], B: list[Tensor], index: list[LayerIndex], normalized: tuple[int, ...]
) -> Tensor:
    """``n`` of every row of a chain: ``n_k = sum over the edges into k of (w B)^2`` of the S2 row ``k``
    where the row's tau chain ends, 1 where it ends at a row that no BatchNorm normalizes
    (docs/math.md, "BatchNorm segments: S1 and S2"). The S2 step divides every row's ``F`` by
    ``sqrt(n)``: G-SGD on the slice ``n_k = 1``.

    Args:
        weights: The layers' weights as ``[n_out, n_in, taps]`` views.
        B: ``B`` of every layer's input columns (:func:`chain_backbone`).
        index: The layers' sigma/tau indices.
        normalized: The chain's S2 layers (``Chain.normalized``).
    """
    w0 = weights[0]
    R = max(idx.row_off + idx.n_out for idx in index)
    n_rows = torch.ones(R, dtype=w0.dtype, device=w0.device)
    for l in normalized:
        n_rows[index[l].rows] = (weights[l] * B[l].view(1, -1, 1)).square().sum((1, 2))
    return n_rows[row_ends(index)]
