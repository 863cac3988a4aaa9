"""Precomputed index tensors that let one G-SGD step on a chain run in a fixed, small number of ops.

The step of :mod:`lightning_gsgd.step.chain_step` needs, per step, only the O(H) *skeleton* entries of each
layer (sigma and free tau weights; H = hidden nodes) besides SGD-like elementwise passes. This module gathers,
once per chain, where those entries live and how the sequential products and sums of the chain (``B``, ``F``,
``F'`` and ``Gamma`` of docs/math.md, "The sigma/tau basis" to "The cheap form") unroll: every such recursion
along a chain is a fixed walk over at most ``L - 1`` nodes, so it is precomputed as an ``[H, L - 1]`` table of
positions and evaluated with one gather and one ``prod``/``sum``.

Layout (all positions are into vectors built per step by :mod:`lightning_gsgd.step.chain_step`):

* ``sel[l]``: flat indices into ``weight.view(-1)`` of layer ``l``'s sigma entries (hidden layers),
  then its free tau entries (layers after the first). Gathering ``sel[l]`` of every layer and
  concatenating gives the chain's *skeleton vector* ``S`` (length ``n_sel``); ``S[n_sel]`` is an
  appended 1 (position ``one``).
* Hidden node ``h`` (``0 <= h < H``) is node ``b`` of hidden layer ``l`` at ``h = hoff[l] + b``; the
  last layer's output nodes follow at ``H .. H + n_out[-1]`` (*row* numbering, used by the per-row
  vectors of :class:`lightning_gsgd.step.chain_step.ChainWork`).
* The skeleton block of the work vector is ``[S (n_sel), 1, G (n_sel), M (n_sel)]``: weights,
  the constant 1, gradients, momentum buffers, each in ``sel`` order.

Nothing here depends on weight values; the plan is rebuilt only when the device changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_gsgd.topology.index import chain_index, row_ends
from lightning_gsgd.topology.types import Chain


@dataclass(frozen=True)
class ChainPlan:
    """Index tensors of one chain (see the module docstring for the layout).

    Attributes:
        n_layers: Number of layers L.
        hidden: Number of hidden nodes H.
        n_rows: Number of rows R (hidden nodes, then the output layers' nodes).
        is_hidden: Per layer, whether its nodes are hidden nodes.
        row_off: Per layer, the offset of its nodes in the row numbering.
        col_range: Per layer, ``(start, stop)`` when its input columns are the hidden nodes
            ``start .. stop - 1``, else ``None``.
        col_node: Per layer, ``[n_in]`` the hidden node of each input column (``H``: outside the chain).
        reads_hidden: Per layer, whether some input column holds a hidden node.
        tau_layers: The layers that hold tau edges.
        n_out: Output nodes per layer.
        row_size: Entries per output node (``n_in * taps``) per layer.
        shape3: ``(n_out, n_in, taps)`` per layer.
        sel: Per layer, flat indices of its sigma entries then its free tau entries.
        n_sig: Per layer, how many of ``sel[l]`` are sigma entries (0 for the last layer).
        n_sel: Length of the skeleton vector (without the appended 1).
        free: ``[H]`` whether node h's tau edge is a free coordinate.
        free_nodes: Hidden nodes with a free tau edge.
        free_pos: Skeleton positions of those free tau edges (``tau_pos[free_nodes]``).
        nxt: ``[H]`` the node that h's tau edge leads to (``H`` for a chain output).
        tau_layer: ``[H]`` the layer that holds node h's tau edge (``l + 1``).
        first_free: ``[H]`` the first node along h's tau chain (h included) whose tau edge is free,
            ``H`` if there is none: ``F'(h) / F(h)`` is that edge's ratio ``v' / v`` (or 1).
        walk_bf: ``[2H + 1, D]`` skeleton positions: rows ``h < H`` the sigma chain from h back to
            the input, row ``H`` none, rows ``H + 1 + h`` the tau chain from h to an output, padded
            with ``one``; so ``S[walk_bf].prod(1)`` is ``[B, 1, F]``.
        walk_g_rows: ``[H, D]`` the hidden nodes whose per-node terms add up to ``Gamma[h]`` (h, then
            back along sigma edges that are also tau edges), padded with ``R``.
        tau_take: ``[3, H]`` skeleton-block positions of node h's tau weight, gradient and buffer
            (a sigma position where the tau edge is not free).
        sig_take: ``[2, H]`` skeleton-block positions of node h's sigma weight and gradient.
        normalized: The chain's S2 layers (output layers whose rows BatchNorm normalizes).
        row_end: ``[R]`` per row, the output row where its tau chain ends (the S2 factor of a row is
            that of its end row: docs/math.md, "BatchNorm segments: S1 and S2").
        tied_layer: Per tied parameter (``ChainLayer.tied``, layer by layer), the layer whose nodes it
            adds into: the step treats it as another hidden bias of that layer.
    """

    n_layers: int
    hidden: int
    n_rows: int
    is_hidden: tuple[bool, ...]
    row_off: tuple[int, ...]
    col_range: tuple[tuple[int, int] | None, ...]
    col_node: tuple[Tensor, ...]
    reads_hidden: tuple[bool, ...]
    tau_layers: tuple[int, ...]
    n_out: tuple[int, ...]
    row_size: tuple[int, ...]
    shape3: tuple[tuple[int, int, int], ...]
    sel: tuple[Tensor, ...]
    n_sig: tuple[int, ...]
    n_sel: int
    free: Tensor
    free_nodes: Tensor
    free_pos: Tensor
    nxt: Tensor
    tau_layer: Tensor
    first_free: Tensor
    walk_bf: Tensor
    walk_g_rows: Tensor
    tau_take: Tensor
    sig_take: Tensor
    normalized: tuple[int, ...]
    row_end: Tensor
    tied_layer: tuple[int, ...] = ()

    @property
    def one(self) -> int:
        """Position of the constant 1 appended to the skeleton vector."""
        return self.n_sel

    @property
    def device(self) -> torch.device:
        """Where the index tensors live."""
        return self.free.device

    def cols(self, node_values: Tensor, l: int) -> Tensor:
        """Per input column of layer ``l``, the entry of ``node_values`` (``[H + 1]``: hidden nodes,
        then the value for columns from outside the chain) of the node it holds; a view when the
        columns are a slice of the hidden nodes."""
        rng = self.col_range[l]
        if rng is not None:
            return node_values[rng[0] : rng[1]]
        return node_values.index_select(0, self.col_node[l])

    def nbytes(self) -> int:
        """Memory held by the plan's index tensors."""
        tensors = [
            *self.sel,
            *self.col_node,
            self.free,
            self.free_nodes,
            self.free_pos,
            self.nxt,
            self.tau_layer,
            self.first_free,
        ]
        tensors += [self.walk_bf, self.walk_g_rows, self.tau_take, self.sig_take, self.row_end]
        return sum(t.numel() * t.element_size() for t in tensors)


def hidden_biases(chain: Chain) -> list[Tensor | None]:
    """What every form of the step treats as hidden biases, in the order it lays them out: per layer its
    bias when the layer is hidden (else ``None``), then the tied parameters (``ChainLayer.tied``) layer
    by layer, whose layers :func:`tied_layers` lists."""
    layers = chain.layers
    return [layer.bias if h else None for layer, h in zip(layers, chain.hidden)] + [t for x in layers for t in x.tied]


def tied_layers(chain: Chain) -> tuple[int, ...]:
    """Per tied parameter of ``chain`` (layer by layer), the layer whose hidden bias it is alongside."""
    return tuple(l for l, layer in enumerate(chain.layers) for _ in layer.tied)


def build_chain_plan(chain: Chain, device: torch.device) -> ChainPlan:
    """Build the :class:`ChainPlan` of ``chain`` with its index tensors on ``device``.

    Args:
        chain: The chain (only its layers' shapes, centre taps and sources are read).
        device: Device of the chain's parameters.
    """
    layers = chain.layers
    L = len(layers)
    index = chain_index(chain, torch.device("cpu"))  # the basis: one source of truth for every form of the step
    row_off = [idx.row_off for idx in index]
    H = index[0].n_hidden
    R = max(idx.row_off + idx.n_out for idx in index)
    long = dict(dtype=torch.long)

    sel: list[Tensor] = []
    n_sig: list[int] = []
    sig_pos = torch.empty(H, **long)
    tau_pos = torch.empty(H, **long)
    free = torch.zeros(H, dtype=torch.bool)
    nxt = torch.empty(H, **long)
    tau_layer = torch.empty(H, **long)
    prev_b = torch.full((H,), -1, **long)
    link_g = torch.full((H,), -1, **long)
    pos = 0
    for l, (layer, idx) in enumerate(zip(layers, index)):
        K = layer.n_in * layer.taps
        parts: list[Tensor] = []
        ns = 0
        if idx.hidden:
            assert idx.sig_rows is not None and idx.sig_cols is not None
            assert idx.sig_src is not None and idx.sig_is_tau is not None
            rows = idx.sig_rows
            parts.append(rows * K + idx.sig_cols * layer.taps + layer.centre)
            ns = layer.n_out
            h = idx.row_off + rows
            sig_pos[h] = pos + rows
            inside = idx.sig_src < H
            prev_b[h[inside]] = idx.sig_src[inside]
            # sigma edge (b <- c) is also the tau edge of c
            link_g[h[idx.sig_is_tau]] = idx.sig_src[idx.sig_is_tau]
        if idx.tau_rows is not None:
            assert idx.tau_cols is not None and idx.tau_nodes is not None and idx.tau_free is not None
            rows, is_free, h = idx.tau_rows, idx.tau_free, idx.tau_nodes
            parts.append((rows * K + idx.tau_cols * layer.taps + layer.centre)[is_free])
            free[h] = is_free
            tau_layer[h] = l
            nxt[h] = idx.row_off + rows if idx.hidden else H
            tau_pos[h[is_free]] = pos + ns + torch.arange(int(is_free.sum()))
            if idx.hidden:
                # a tau edge that is not free is the sigma edge of its row
                tau_pos[h[~is_free]] = sig_pos[idx.row_off + rows[~is_free]]
        s = torch.cat(parts) if parts else torch.empty(0, **long)
        sel.append(s)
        n_sig.append(ns)
        pos += s.numel()
    n_sel = pos
    one = n_sel

    def walk(step: Tensor, value: Tensor, pad: int, stop_after: Tensor | None = None) -> Tensor:
        """Rows of ``value[node]`` along ``node -> step[node]`` from every h, padded with ``pad``
        (as many columns as the longest walk)."""
        cols: list[Tensor] = []
        node = torch.arange(H)
        alive = torch.ones(H, dtype=torch.bool)
        step_ext = torch.cat([step, torch.tensor([-1])])
        value_ext = torch.cat([value, torch.tensor([pad])])
        for _ in range(L):
            if not bool(alive.any()):
                break
            safe = torch.where(alive, node, torch.full_like(node, H))
            cols.append(torch.where(alive, value_ext[safe], torch.full_like(node, pad)))
            if stop_after is not None:
                alive = alive & ~torch.cat([stop_after, torch.tensor([True])])[safe]
            nn_ = step_ext[safe]
            alive = alive & (nn_ >= 0) & (nn_ < H)
            node = torch.where(alive, nn_, torch.full_like(node, H))
        return torch.stack(cols, 1) if cols else torch.full((H, 1), pad, **long)

    def pad_to(t: Tensor, width: int, pad: int) -> Tensor:
        return torch.cat([t, torch.full((t.shape[0], width - t.shape[1]), pad, **long)], 1)

    hs = torch.arange(H)
    nxt_step = torch.where(nxt >= H, torch.full_like(nxt, -1), nxt)
    walk_b = walk(prev_b, sig_pos, one)
    walk_f = walk(nxt_step, tau_pos, one)
    walk_g = walk(link_g, hs, H)
    walk_n = walk(nxt_step, hs, H, stop_after=free)
    free_nodes = torch.nonzero(free).flatten()
    # last entry of each walk_n row: the walk stops at the first free node or runs out at the output
    lengths = (walk_n < H).sum(1)
    end = walk_n.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    first_free = torch.where(free[end] & (lengths > 0), end, torch.full_like(end, H))
    walk_g_rows = torch.where(walk_g == H, torch.full_like(walk_g, R), walk_g)
    # [B (H rows), 1 (a row of pads), F (H rows)]: one product fills B, the 1 after it and F
    D = max(walk_b.shape[1], walk_f.shape[1])
    walk_bf = torch.cat([pad_to(walk_b, D, one), torch.full((1, D), one, **long), pad_to(walk_f, D, one)])
    g_off, m_off = n_sel + 1, 2 * n_sel + 1
    tau_take = torch.stack([tau_pos, tau_pos + g_off, tau_pos + m_off])
    sig_take = torch.stack([sig_pos, sig_pos + g_off])

    def dev(t: Tensor) -> Tensor:
        if device.type == "cuda":  # from pinned memory the copy does not block the host
            return t.pin_memory().to(device, non_blocking=True)
        return t.to(device)

    return ChainPlan(
        n_layers=L,
        hidden=H,
        n_rows=R,
        is_hidden=tuple(chain.hidden),
        row_off=tuple(row_off),
        col_range=tuple(idx.col_range for idx in index),
        col_node=tuple(dev(idx.col_node) for idx in index),
        reads_hidden=tuple(idx.reads_hidden for idx in index),
        tau_layers=tuple(l for l, idx in enumerate(index) if idx.tau_rows is not None),
        n_out=tuple(layer.n_out for layer in layers),
        row_size=tuple(layer.n_in * layer.taps for layer in layers),
        shape3=tuple((layer.n_out, layer.n_in, layer.taps) for layer in layers),
        sel=tuple(dev(s) for s in sel),
        n_sig=tuple(n_sig),
        n_sel=n_sel,
        free=dev(free),
        free_nodes=dev(free_nodes),
        free_pos=dev(tau_pos[free_nodes]),
        nxt=dev(nxt),
        tau_layer=dev(tau_layer),
        first_free=dev(first_free),
        walk_bf=dev(walk_bf),
        walk_g_rows=dev(walk_g_rows),
        tau_take=dev(tau_take),
        sig_take=dev(sig_take),
        normalized=tuple(chain.normalized),
        row_end=dev(row_ends(index)),
        tied_layer=tied_layers(chain),
    )
