"""``GSGD``'s compiled step (``compiled=True``): the glue around :mod:`lightning_gsgd.chain_graph`.

:class:`GSGDGraphMixin` collects every chain tensor, its gradient and its momentum buffer (a zero
buffer is made for a first momentum step), the parameters outside chains, the hyper-parameter
tables (reused while their numbers do not change) and the counters, and runs the compiled graph,
which writes everything through ``torch.where`` on its ``ok`` flag. On the CPU that flag is then
read (free there) so that a skipped first momentum step keeps no buffer, as in the eager step; on
accelerators nothing is read and the step never synchronizes. A step that makes no buffer leaves
its arguments, all but the gradients, for the next step to replay (:class:`_Replay`), so that
later steps skip this per-tensor Python while nothing else changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_gsgd.chain_graph import (
    A_BUF,
    A_D,
    K_BUF,
    K_D,
    LR,
    MIN_RATIO,
    N_HP,
    WD,
    ChainGraphs,
    GraphChain,
    graph_chain,
)
from lightning_gsgd.chain_step import step_coefficients
from lightning_gsgd.functional import Hyper
from lightning_gsgd.topology import Chain

_NO_ROW: list[float | Tensor] = [0.0] * N_HP
_COUNTERS = ("steps", "skipped_steps", "guard_hits")


def _groups_key(groups: list[dict[str, Any]]) -> list[tuple[Any, ...]] | None:
    """What the compiled step's tables and parameter lists depend on in the parameter groups (which
    parameters, the hyper-parameters); ``None`` when a group has a tensor lr, which may change in place."""
    key = []
    for g in groups:
        if isinstance(g["lr"], Tensor):
            return None
        params = g["params"]
        hp = (g["lr"], g["momentum"], g["dampening"], g["weight_decay"], g["nesterov"], g["min_ratio"])
        key.append((id(params), len(params), *hp))
    return key


@dataclass
class _Replay:
    """The last compiled step's arguments, all but the gradients, and what they were built from.

    While the parameter groups' hyper-parameters, which parameters have a gradient, and every
    momentum buffer are those of that step (``bind`` drops it), the next step needs only the new
    gradients: it skips the per-parameter Python of :meth:`_graph_step` (on a small network that
    Python is a large part of the step).
    """

    groups: list[tuple[Any, ...]]
    device: torch.device
    params: list[Tensor]  # every parameter of the optimizer, in group order
    no_grad: list[bool]  # per parameter, whether it had no gradient
    first: int  # a parameter with a gradient (for the device check)
    buffers: list[tuple[Tensor, Tensor]]  # (parameter, its momentum buffer in the state)
    fn: Any  # the compiled step
    chains: list[GraphChain]
    ws: list[list[Tensor]]
    bufs: list[list[Tensor | None]]
    bws: list[list[Tensor | None]]
    bbufs: list[list[Tensor | None]]
    hps: list[Tensor]
    ps: list[Tensor]
    pbufs: list[Tensor | None]
    ptab: Tensor
    g_at: list[list[int]]  # per chain tensor, its gradient's index in ``params``
    bg_at: list[list[int]]  # per chain bias, its gradient's index (-1: None)
    pg_at: list[int]  # per parameter outside chains


def _hp_row(hp: Hyper, has_buf: bool, min_ratio: float) -> list[float | Tensor]:
    """A row of the hyper-parameter table (:mod:`lightning_gsgd.chain_graph`) for one tensor."""
    row: list[float | Tensor] = [0.0] * N_HP
    row[LR], row[WD], row[K_BUF], row[K_D], row[A_D], row[A_BUF] = step_coefficients(hp, has_buf)
    row[MIN_RATIO] = min_ratio
    return row


def _table(rows: list[list[float | Tensor]], device: torch.device) -> Tensor:
    """The rows as one float64 tensor on ``device``, without stalling the host: the numbers go by a
    non-blocking copy from pinned memory, tensor entries (a tensor lr) by device-side copies."""
    t = torch.tensor([[0.0 if isinstance(x, Tensor) else x for x in row] for row in rows], dtype=torch.float64)
    if device.type != "cpu":
        t = t.pin_memory().to(device, non_blocking=True)  # the caching host allocator keeps the block
    for i, row in enumerate(rows):
        for j, x in enumerate(row):
            if isinstance(x, Tensor):
                t[i, j] = x.detach().to(device=device, dtype=torch.float64).reshape(())
    return t


class GSGDGraphMixin:
    """``GSGD``'s compiled step (relies on the optimizer's ``state``, counters and plans)."""

    state: Any
    _graphs: ChainGraphs | None
    _graph_chains: dict[int, tuple[Any, GraphChain]]
    _graph_tables: dict[int, tuple[list[list[float | Tensor]], Tensor]]
    _replay: _Replay | None
    topology: Any
    param_groups: list[dict[str, Any]]

    def _chain_plan(self, ci: int, chain: Chain) -> Any:  # provided by GSGD
        raise NotImplementedError

    def _counter(self, name: str, device: torch.device) -> Tensor:  # provided by GSGDStateMixin
        raise NotImplementedError

    def _graph_chain(self, ci: int, chain: Chain) -> GraphChain:
        plan = self._chain_plan(ci, chain)
        cached = self._graph_chains.get(ci)
        if cached is None or cached[0] is not plan:
            cached = (plan, graph_chain(plan, tuple(layer.centre for layer in chain.layers)))
            self._graph_chains[ci] = cached
        return cached[1]

    def _graph_step(
        self,
        chains: list[Chain],
        hp_of: dict[int, tuple[Hyper, dict[str, Any]]],
        plain: list[tuple[Tensor, Hyper]],
        device: torch.device,
        host_reads: bool,
    ) -> bool:
        """One step with the compiled graph (see the module docstring); ``False`` (and nothing done)
        when no chain has a gradient."""
        graph_chains: list[GraphChain] = []
        ws: list[list[Tensor]] = []
        gs: list[list[Tensor]] = []
        bufs: list[list[Tensor | None]] = []
        bws: list[list[Tensor | None]] = []
        bgs: list[list[Tensor | None]] = []
        bbufs: list[list[Tensor | None]] = []
        hps: list[Tensor] = []
        made: list[tuple[Tensor, Tensor]] = []  # (parameter, buffer) first made in this step
        for ci, chain in enumerate(chains):
            layers = chain.layers
            if all(layer.weight.grad is None for layer in layers):
                continue
            graph_chains.append(self._graph_chain(ci, chain))
            last = len(layers) - 1
            min_ratio = hp_of[id(layers[0].weight)][1]["min_ratio"]
            cw: list[Tensor] = []
            cg: list[Tensor] = []
            cb: list[Tensor | None] = []
            cbw: list[Tensor | None] = []
            cbg: list[Tensor | None] = []
            cbb: list[Tensor | None] = []
            rows: list[list[float | Tensor]] = []
            bias_rows: list[list[float | Tensor]] = []
            for l, layer in enumerate(layers):
                w = layer.weight
                hp = hp_of[id(w)][0]
                cw.append(w)
                cg.append(w.grad if w.grad is not None else torch.zeros_like(w))
                buf, had = self._graph_buffer(w, hp, made)
                cb.append(buf)
                rows.append(_hp_row(hp, had, min_ratio))
                b = layer.bias
                if b is None or b.grad is None or l == last:
                    cbw.append(None)
                    cbg.append(None)
                    cbb.append(None)
                    bias_rows.append(_NO_ROW)
                    continue
                hpb = hp_of[id(b)][0]
                bbuf, had = self._graph_buffer(b, hpb, made)
                cbw.append(b)
                cbg.append(b.grad)
                cbb.append(bbuf)
                bias_rows.append(_hp_row(hpb, had, min_ratio))
            ws.append(cw)
            gs.append(cg)
            bufs.append(cb)
            bws.append(cbw)
            bgs.append(cbg)
            bbufs.append(cbb)
            hps.append(self._graph_table(ci, rows + bias_rows, device))
        if not graph_chains:
            return False
        if self._graphs is None:
            self._graphs = ChainGraphs()
        ps = [p for p, _ in plain]
        pbufs: list[Tensor | None] = []
        prows: list[list[float | Tensor]] = []
        for p, hp in plain:
            buf, had = self._graph_buffer(p, hp, made)
            pbufs.append(buf)
            prows.append(_hp_row(hp, had, 0.0))
        ptab = (
            self._graph_table(-1, prows, device)
            if prows
            else torch.zeros((0, N_HP), dtype=torch.float64, device=device)
        )
        counters = [self._counter(name, device) for name in _COUNTERS]
        fn = self._graphs.compiled_for(graph_chains, bufs, bws, bgs, bbufs, pbufs)
        ok, _ = fn(graph_chains, ws, gs, bufs, bws, bgs, bbufs, hps, (ps, [p.grad for p in ps], pbufs, ptab), counters)
        self._replay = None
        if made:
            if host_reads and not bool(ok):
                return True  # nothing was written (the graph counted the skip); a first step's buffers are dropped
            for p, buf in made:  # zeros where the step was not ok (the graph wrote through torch.where)
                self.state[p]["momentum_buffer"] = buf
            return True
        groups = _groups_key(self.param_groups)
        every_weight = all(layer.weight.grad is not None for chain in chains for layer in chain.layers)
        if groups is not None and every_weight and not getattr(self.topology, "bn_layers", ()):
            params = [p for g in self.param_groups for p in g["params"]]
            at = {id(p): i for i, p in enumerate(params)}
            self._replay = _Replay(
                groups,
                device,
                params,
                [p.grad is None for p in params],
                next(i for i, p in enumerate(params) if p.grad is not None),
                [
                    (p, self.state[p]["momentum_buffer"])
                    for p in params
                    if p.grad is not None and p in self.state and self.state[p].get("momentum_buffer") is not None
                ],
                fn,
                graph_chains,
                ws,
                bufs,
                bws,
                bbufs,
                hps,
                ps,
                pbufs,
                ptab,
                [[at[id(w)] for w in cw] for cw in ws],
                [[-1 if b is None else at[id(b)] for b in cbw] for cbw in bws],
                [at[id(p)] for p in ps],
            )
        return True

    def _graph_replay(self) -> bool:
        """The step with the last compiled step's arguments and new gradients, when they are still
        valid (see :class:`_Replay`); ``False`` (and nothing done) otherwise."""
        r = self._replay
        if r is None or _groups_key(self.param_groups) != r.groups:
            return False
        if not all(w.is_contiguous() for cw in r.ws for w in cw):
            return False  # the step that rebuilds the arguments refuses it by name
        grads = [p.grad for p in r.params]
        if [g is None for g in grads] != r.no_grad or grads[r.first].device != r.device:  # type: ignore[union-attr]
            return False
        state = self.state
        for p, buf in r.buffers:
            st = state.get(p)
            if st is None or st.get("momentum_buffer") is not buf:
                return False
        gs = [[grads[i] for i in at] for at in r.g_at]
        bgs = [[None if i < 0 else grads[i] for i in at] for at in r.bg_at]
        pgs = [grads[i] for i in r.pg_at]
        counters = [self._counter(name, r.device) for name in _COUNTERS]
        r.fn(r.chains, r.ws, gs, r.bufs, r.bws, bgs, r.bbufs, r.hps, (r.ps, pgs, r.pbufs, r.ptab), counters)
        return True

    def _graph_table(self, ci: int, rows: list[list[float | Tensor]], device: torch.device) -> Tensor:
        """The chain's hyper-parameter table, reused while its numbers do not change."""
        cached = self._graph_tables.get(ci)
        if cached is not None and cached[0] == rows and cached[1].device == device:
            return cached[1]
        table = _table(rows, device)
        if not any(isinstance(x, Tensor) for row in rows for x in row):  # a tensor lr may change in place
            self._graph_tables[ci] = (rows, table)
        return table

    def _graph_buffer(self, p: Tensor, hp: Hyper, made: list[tuple[Tensor, Tensor]]) -> tuple[Tensor | None, bool]:
        """``(buffer, existed)`` of a chain tensor: ``None`` without momentum, a new zero buffer
        (recorded in ``made``) on its first momentum step, viewed with the parameter's shape."""
        if hp.momentum == 0:
            return None, False
        st = self.state.get(p)
        buf = None if st is None else st.get("momentum_buffer")
        if buf is None:
            buf = torch.zeros_like(p, memory_format=torch.contiguous_format)
            made.append((p, buf))
            return buf, False
        return (buf if buf.shape == p.shape else buf.view(p.shape)), True
