"""Per-chain scratch memory of the G-SGD step: O(H) vectors and a small reduction buffer.

Everything the step of :mod:`lightning_gsgd.step.chain_step` computes besides the parameters and
momentum buffers lives here, allocated once per (chain, dtype, device) and reused, so that a step
allocates no weight-sized temporaries and creates no views. Nothing here is optimizer state.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_gsgd.step.plan import ChainPlan

# Entries of the buffer that holds ``w * g`` for the row sums, one chunk of rows at a time: small
# enough to stay in a core's cache, large enough that the Python loop over chunks costs little.
CHUNK = 1 << 17


class ChainWork:
    """Scratch vectors of one chain and views into them.

    One flat tensor holds:

    * the skeleton block ``[S, 1, G, M]`` (see :class:`lightning_gsgd.step.plan.ChainPlan`);
    * ``B`` (hidden nodes), a 1 (``B`` of columns from outside the chain), then ``F`` over all
      rows (hidden nodes, then the output layers' nodes, where ``F = 1``), so that one product
      fills them;
    * per-row ``1 / rho = F / F'``, ``r = 1 / F``, ``q = r / rho`` and ``q2 = r q`` (1 on the output
      layers' rows);
    * ``ratio`` (``v' / v`` at free tau edges) and ``rho`` over hidden nodes, each followed by a 1;
    * the per-row sums ``sum(w * g)`` followed by a 0.

    Chains with S2 layers (``plan.normalized``) also hold ``n_rows``: ``n`` of the S2 layers' rows
    (``sum (w B)^2``; 1 elsewhere), whose square root at each row's end divides ``F``.

    Args:
        plan: The chain's index plan.
        dtype: Parameter dtype.
        device: Parameter device.
    """

    def __init__(self, plan: ChainPlan, dtype: torch.dtype, device: torch.device) -> None:
        self.plan, self.dtype, self.device = plan, dtype, device
        H, n_sel, L = plan.hidden, plan.n_sel, plan.n_layers
        R = plan.n_rows
        sizes = [3 * n_sel + 1, H + 1 + 5 * R, 2 * (H + 1), R + 1]
        self.vec = torch.zeros(sum(sizes), dtype=dtype, device=device)
        skel, rowblk, ratios, base = torch.split(self.vec, sizes)
        skel[n_sel] = 1
        self.skel = skel
        self.sw = skel[:n_sel]
        self.sg = skel[n_sel + 1 : 2 * n_sel + 1]
        self.sbuf = skel[2 * n_sel + 1 :]
        self.rowblk = rowblk
        self.bf = rowblk[: 2 * H + 1]
        self.B = rowblk[:H]
        self.B_ext = rowblk[: H + 1]
        rowblk[H] = 1
        F, rhoinv, r, q, q2 = (rowblk[H + 1 + k * R : H + 1 + (k + 1) * R] for k in range(5))
        for v in (F, rhoinv, r, q, q2):
            v[H:] = 1
        self.F, self.rhoinv, self.r, self.q, self.q2 = F, rhoinv, r, q, q2
        self.ratio_ext, self.rho_ext = ratios[: H + 1], ratios[H + 1 :]
        ratios[H] = 1
        ratios[2 * H + 1] = 1
        self.base = base  # base[R] stays 0: padding of walk_g_rows
        self.ones_h = torch.ones(H, dtype=dtype, device=device)

        rows = [slice(a, a + plan.n_out[l]) for l, a in enumerate(plan.row_off)]
        offs = [0]
        for s in plan.sel:
            offs.append(offs[-1] + s.numel())
        sel = [slice(offs[l], offs[l + 1]) for l in range(L)]
        vectors = {"F": F, "rhoinv": rhoinv, "r": r, "q": q, "q2": q2}
        # per layer: [n_out, 1, 1] views (weights) and [n_out] views (biases) of the per-row vectors
        self.row3 = {k: [v[sl].view(-1, 1, 1) for sl in rows] for k, v in vectors.items()}
        self.row1 = {k: [v[sl] for sl in rows] for k, v in vectors.items()}
        self.base_rows = [base[sl] for sl in rows]
        self.sw_l = [self.sw[sl] for sl in sel]
        self.sg_l = [self.sg[sl] for sl in sel]
        self.sbuf_l = [self.sbuf[sl] for sl in sel]
        # rows per chunk of every hidden layer's [n_out, K] view, for the row sums (0: not hidden)
        # (and of every S2 layer, for the row norms)
        hidden = [h or l in plan.normalized for l, h in enumerate(plan.is_hidden)]
        self.chunk_rows = [max(1, CHUNK // plan.row_size[l]) if hidden[l] else 0 for l in range(L)]
        width = max(
            (min(plan.n_out[l], self.chunk_rows[l]) * plan.row_size[l] for l in range(L) if hidden[l]), default=0
        )
        self.n_rows = torch.ones(R, dtype=dtype, device=device)
        self.n_rows_l = [self.n_rows[sl] for sl in rows]
        self.scratch = torch.empty(width, dtype=dtype, device=device)
        # layers that fit in one chunk: a ready [n_out, n_in, taps] view of the scratch
        self.whole = [
            self.scratch[: plan.n_out[l] * plan.row_size[l]].view(plan.shape3[l])
            if hidden[l] and self.chunk_rows[l] >= plan.n_out[l]
            else None
            for l in range(L)
        ]
        self.F_h, self.ratio, self.rho = F[:H], self.ratio_ext[:H], self.rho_ext[:H]
        self.rhoinv_h, self.base_h = rhoinv[:H], base[:H]

    def fits(self, plan: ChainPlan, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether this work area belongs to ``plan`` and matches the parameters' dtype and device."""
        return self.plan is plan and self.dtype == dtype and self.device == device

    def nbytes(self) -> int:
        """Memory held by the work area."""
        return (self.vec.numel() + self.ones_h.numel() + self.scratch.numel()) * self.vec.element_size()

    def row_norms_(self, l: int, w: Tensor, b_cols: Tensor | None) -> None:
        """``n_rows`` of layer ``l``: ``sum over each row of (w B)^2`` (``b_cols``: ``[1, n_in, 1]``, or
        ``None`` for a ``B`` of ones), chunk by chunk like :meth:`row_sums_`."""
        out = self.n_rows_l[l]
        n, n_in, taps = w.shape
        step = self.chunk_rows[l]
        for i in range(0, n, step):
            j = min(n, i + step)
            tmp = self.scratch[: (j - i) * n_in * taps].view(j - i, n_in, taps)
            if b_cols is None:
                torch.mul(w[i:j], w[i:j], out=tmp)
            else:
                torch.mul(w[i:j], b_cols, out=tmp).square_()
            torch.sum(tmp, (1, 2), out=out[i:j])

    def row_sums_(self, l: int, w: Tensor, g: Tensor) -> None:
        """``base_rows[l] = sum over each row of w * g`` (``[n_out, n_in, taps]`` views), chunk by chunk."""
        out = self.base_rows[l]
        whole = self.whole[l]
        if whole is not None:
            torch.sum(torch.mul(w, g, out=whole), (1, 2), out=out)
            return
        n = w.shape[0]
        w, g = w.view(n, -1), g.view(n, -1)
        k = w.shape[1]
        step = self.chunk_rows[l]
        for i in range(0, n, step):
            j = min(n, i + step)
            tmp = self.scratch[: (j - i) * k].view(j - i, k)
            torch.mul(w[i:j], g[i:j], out=tmp)
            torch.sum(tmp, 1, out=out[i:j])
