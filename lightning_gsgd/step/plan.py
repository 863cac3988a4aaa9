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

from lightning_gsgd.topology.types import Chain


@dataclass(frozen=True)
class ChainPlan:
    """Index tensors of one chain (see the module docstring for the layout).

    Attributes:
        n_layers: Number of layers L.
        hidden: Number of hidden nodes H.
        hoff: Offset of hidden layer ``l``'s nodes in the hidden-node numbering (``l < L - 1``).
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
        walk_bf: ``[2H, D]`` skeleton positions: rows ``h < H`` the sigma chain from h back to the
            input, rows ``H + h`` the tau chain from h to the output, padded with ``one``; so
            ``S[walk_bf].prod(1)`` is ``[B, F]``.
        walk_g_rows: ``[H, D]`` the hidden nodes whose per-node terms add up to ``Gamma[h]`` (h, then
            back along sigma edges that are also tau edges), padded with ``H + n_out[-1]``.
        tau_take: ``[3, H]`` skeleton-block positions of node h's tau weight, gradient and buffer
            (a sigma position where the tau edge is not free).
        sig_take: ``[2, H]`` skeleton-block positions of node h's sigma weight and gradient.
    """

    n_layers: int
    hidden: int
    hoff: tuple[int, ...]
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

    @property
    def one(self) -> int:
        """Position of the constant 1 appended to the skeleton vector."""
        return self.n_sel

    @property
    def device(self) -> torch.device:
        """Where the index tensors live."""
        return self.free.device

    def nbytes(self) -> int:
        """Memory held by the plan's index tensors."""
        tensors = [*self.sel, self.free, self.free_nodes, self.free_pos, self.nxt, self.tau_layer, self.first_free]
        tensors += [self.walk_bf, self.walk_g_rows, self.tau_take, self.sig_take]
        return sum(t.numel() * t.element_size() for t in tensors)


def build_chain_plan(chain: Chain, device: torch.device) -> ChainPlan:
    """Build the :class:`ChainPlan` of ``chain`` with its index tensors on ``device``.

    Args:
        chain: The chain (only its layers' shapes and centre taps are read).
        device: Device of the chain's parameters.
    """
    layers = chain.layers
    L = len(layers)
    n_out = [layer.n_out for layer in layers]
    hoff = [0] * (L - 1)
    for l in range(1, L - 1):
        hoff[l] = hoff[l - 1] + n_out[l - 1]
    H = hoff[-1] + n_out[L - 2]
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
    for l, layer in enumerate(layers):
        K = layer.n_in * layer.taps
        parts: list[Tensor] = []
        ns = 0
        if l < L - 1:
            rows = torch.arange(layer.n_out)
            cols = rows % layer.n_in
            parts.append(rows * K + cols * layer.taps + layer.centre)
            ns = layer.n_out
            h = hoff[l] + rows
            sig_pos[h] = pos + rows
            if l > 0:
                prev_b[h] = hoff[l - 1] + cols
                # sigma edge (b <- c) is also the tau edge of c when c's tau leads to b
                is_tau = (cols % layer.n_out) == rows
                link_g[h[is_tau]] = hoff[l - 1] + cols[is_tau]
        if l > 0:
            cols = torch.arange(layer.n_in)
            rows = cols % layer.n_out
            is_free = torch.ones(layer.n_in, dtype=torch.bool) if l == L - 1 else cols != rows % layer.n_in
            parts.append((rows * K + cols * layer.taps + layer.centre)[is_free])
            h = hoff[l - 1] + cols
            free[h] = is_free
            tau_layer[h] = l
            nxt[h] = H if l == L - 1 else hoff[l] + rows
            tau_pos[h[is_free]] = pos + ns + torch.arange(int(is_free.sum()))
            if l < L - 1:
                # a tau edge that is not free is the sigma edge of its row
                tau_pos[h[~is_free]] = sig_pos[hoff[l] + rows[~is_free]]
        s = torch.cat(parts) if parts else torch.empty(0, **long)
        sel.append(s)
        n_sig.append(ns)
        pos += s.numel()
    n_sel = pos
    one = n_sel
    D = L - 1

    def walk(start_vals: Tensor, step: Tensor, value: Tensor, pad: int, stop_after: Tensor | None = None) -> Tensor:
        """Rows of ``value[node]`` along ``node -> step[node]`` from every h, padded with ``pad``."""
        out = torch.full((H, D), pad, **long)
        node = start_vals.clone()
        alive = torch.ones(H, dtype=torch.bool)
        step_ext = torch.cat([step, torch.tensor([-1])])
        value_ext = torch.cat([value, torch.tensor([pad])])
        for k in range(D):
            safe = torch.where(alive, node, torch.full_like(node, H))
            out[:, k] = torch.where(alive, value_ext[safe], torch.full_like(node, pad))
            if stop_after is not None:
                alive = alive & ~torch.cat([stop_after, torch.tensor([True])])[safe]
            nn_ = step_ext[safe]
            alive = alive & (nn_ >= 0) & (nn_ < H)
            node = torch.where(alive, nn_, torch.full_like(node, H))
        return out

    hs = torch.arange(H)
    nxt_step = torch.where(nxt >= H, torch.full_like(nxt, -1), nxt)
    walk_b = walk(hs, prev_b, sig_pos, one)
    walk_f = walk(hs, nxt_step, tau_pos, one)
    walk_g = walk(hs, link_g, hs, H)
    walk_n = walk(hs, nxt_step, hs, H, stop_after=free)
    free_nodes = torch.nonzero(free).flatten()
    # last entry of each walk_n row: the walk stops at the first free node or runs out at the output
    lengths = (walk_n < H).sum(1)
    end = walk_n.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    first_free = torch.where(free[end] & (lengths > 0), end, torch.full_like(end, H))
    walk_g_rows = torch.where(walk_g == H, torch.full_like(walk_g, H + n_out[-1]), walk_g)
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
        hoff=tuple(hoff),
        n_out=tuple(n_out),
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
        walk_bf=dev(torch.cat([walk_b, walk_f])),
        walk_g_rows=dev(walk_g_rows),
        tau_take=dev(tau_take),
        sig_take=dev(sig_take),
    )
