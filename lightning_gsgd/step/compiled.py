"""The compiled step (``GSGD(compiled=True)``): the glue around :mod:`lightning_gsgd.step.graph`.

:class:`CompiledStep` collects every chain tensor, its gradient and its momentum buffer (a zero
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

from lightning_gsgd.step.eager import eager_step
from lightning_gsgd.step.graph import ChainGraphs
from lightning_gsgd.step.graph_chain import A_BUF, A_D, K_BUF, K_D, LR, MIN_RATIO, N_HP, WD, GraphChain, graph_chain
from lightning_gsgd.step.hyper import Hyper, step_coefficients
from lightning_gsgd.step.inputs import ChainCaches, StepArgs, StepCounters
from lightning_gsgd.step.plan import hidden_biases
from lightning_gsgd.step.slots import ChainReading
from lightning_gsgd.topology.types import Chain

_NO_ROW: list[float | Tensor] = [0.0] * N_HP


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
    ns: list[Tensor]  # weights of the S2 layers outside chains
    nbufs: list[Tensor | None]
    ntab: Tensor
    g_at: list[list[int]]  # per chain tensor, its gradient's index in ``params``
    bg_at: list[list[int]]  # per chain bias, its gradient's index (-1: None)
    pg_at: list[int]  # per parameter outside chains
    ng_at: list[int]  # per S2 layer outside chains


def _hp_row(hp: Hyper, has_buf: bool, min_ratio: float) -> list[float | Tensor]:
    """A row of the hyper-parameter table (:mod:`lightning_gsgd.step.graph`) for one tensor."""
    row: list[float | Tensor] = [0.0] * N_HP
    row[LR], row[WD], row[K_BUF], row[K_D], row[A_D], row[A_BUF] = step_coefficients(hp, has_buf)
    row[MIN_RATIO] = min_ratio
    return row


def hp_table(rows: list[list[float | Tensor]], device: torch.device) -> Tensor:
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


class HpTables:
    """Each chain's hyper-parameter table (and negative keys': the tensors outside chains), reused while
    its numbers do not change, so that an unchanged step builds no table.

    Args:
        width: Columns of a table (the step's number of hyper-parameters), for the empty table of no rows.
    """

    def __init__(self, width: int) -> None:
        self.width = width
        self._tables: dict[int, tuple[list[list[float | Tensor]], Tensor]] = {}

    def get(self, ci: int, rows: list[list[float | Tensor]], device: torch.device) -> Tensor:
        """The table of ``rows`` for chain ``ci``: the cached one when its rows are equal (``[0, width]``
        for no rows)."""
        if not rows:
            return torch.zeros((0, self.width), dtype=torch.float64, device=device)
        cached = self._tables.get(ci)
        if cached is not None and cached[0] == rows and cached[1].device == device:
            return cached[1]
        table = hp_table(rows, device)
        if not any(isinstance(x, Tensor) for row in rows for x in row):  # a tensor lr may change in place
            self._tables[ci] = (rows, table)
        return table


class CompiledStep:
    """The step as one ``torch.compile`` graph, with its caches: the compiled variants, each chain's
    graph description and hyper-parameter table, and the last step's arguments for a replay.

    Args:
        caches: The optimizer's per-chain plans (shared with the eager step).
    """

    def __init__(self, caches: ChainCaches) -> None:
        self.caches = caches
        self.graphs: ChainGraphs | None = None
        self._graph_chains: dict[int, tuple[Any, GraphChain]] = {}
        self._tables = HpTables(N_HP)
        self.last: _Replay | None = None

    def reset(self) -> None:
        """Forget everything derived from the topology and its plans (the compiled variants stay)."""
        self._graph_chains = {}
        self._tables = HpTables(N_HP)
        self.last = None

    def __call__(self, args: StepArgs) -> dict[int, ChainReading] | None:
        """One step (the signature of :func:`~lightning_gsgd.step.eager.eager_step`; never readings).

        When no chain has a gradient it runs the eager step, which then only has the parameters
        outside chains to update.
        """
        if not self._graph_step(args):
            return eager_step(args)
        return None

    def _graph_chain(self, ci: int, chain: Chain) -> GraphChain:
        plan = self.caches.plan(ci, chain)
        cached = self._graph_chains.get(ci)
        if cached is None or cached[0] is not plan:
            cached = (plan, graph_chain(plan, tuple(layer.centre for layer in chain.layers)))
            self._graph_chains[ci] = cached
        return cached[1]

    def _graph_step(self, args: StepArgs) -> bool:
        """One step with the compiled graph (see the module docstring); ``False`` (and nothing done)
        when no chain has a gradient."""
        chains, hp_of, plain, device, state = args.chains, args.hp_of, args.plain, args.device, args.state
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
            min_ratio = hp_of[id(layers[0].weight)][1]["min_ratio"]
            cw: list[Tensor] = []
            cg: list[Tensor] = []
            cb: list[Tensor | None] = []
            cbw: list[Tensor | None] = []
            cbg: list[Tensor | None] = []
            cbb: list[Tensor | None] = []
            rows: list[list[float | Tensor]] = []
            bias_rows: list[list[float | Tensor]] = []
            for layer in layers:
                w = layer.weight
                hp = hp_of[id(w)][0]
                cw.append(w)
                cg.append(w.grad if w.grad is not None else torch.zeros_like(w))
                buf, had = _buffer(state, w, hp, made)
                cb.append(buf)
                rows.append(_hp_row(hp, had, min_ratio))
            for b in hidden_biases(chain):  # the layers' hidden biases, then the tied parameters
                if b is None or b.grad is None:
                    cbw.append(None)
                    cbg.append(None)
                    cbb.append(None)
                    bias_rows.append(_NO_ROW)
                    continue
                hpb = hp_of[id(b)][0]
                bbuf, had = _buffer(state, b, hpb, made)
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
            hps.append(self._tables.get(ci, rows + bias_rows, device))
        if not graph_chains:
            return False
        if self.graphs is None:
            self.graphs = ChainGraphs()
        ps = [p for p, _ in plain]
        pbufs: list[Tensor | None] = []
        prows: list[list[float | Tensor]] = []
        for p, hp in plain:
            buf, had = _buffer(state, p, hp, made)
            pbufs.append(buf)
            prows.append(_hp_row(hp, had, 0.0))
        ptab = self._tables.get(-1, prows, device)
        ns = [layer.weight for layer in args.normalized]
        nbufs: list[Tensor | None] = []
        nrows: list[list[float | Tensor]] = []
        for w in ns:
            buf, had = _buffer(state, w, hp_of[id(w)][0], made)
            nbufs.append(buf)
            nrows.append(_hp_row(hp_of[id(w)][0], had, 0.0))
        ntab = self._tables.get(-2, nrows, device)
        counters = args.counters.all_on(device)
        fn = self.graphs.compiled_for(graph_chains, ws, bufs, bws, bgs, bbufs, pbufs, nbufs)
        plain_args = (ps, [p.grad for p in ps], pbufs, ptab)
        norm_args = (ns, [w.grad for w in ns], nbufs, ntab)
        ok, _ = fn(graph_chains, ws, gs, bufs, bws, bgs, bbufs, hps, plain_args, norm_args, counters)
        self.last = None
        if made:
            if args.host_reads and not bool(ok):
                return True  # nothing was written (the graph counted the skip); a first step's buffers are dropped
            for p, buf in made:  # zeros where the step was not ok (the graph wrote through torch.where)
                state[p]["momentum_buffer"] = buf
            return True
        groups = _groups_key(args.param_groups)
        every_weight = all(layer.weight.grad is not None for chain in chains for layer in chain.layers)
        if groups is not None and every_weight:  # (a BN-heuristic layer always takes the eager step)
            params = [p for g in args.param_groups for p in g["params"]]
            at = {id(p): i for i, p in enumerate(params)}
            self.last = _Replay(
                groups,
                device,
                params,
                [p.grad is None for p in params],
                next(i for i, p in enumerate(params) if p.grad is not None),
                [
                    (p, state[p]["momentum_buffer"])
                    for p in params
                    if p.grad is not None and p in state and state[p].get("momentum_buffer") is not None
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
                ns,
                nbufs,
                ntab,
                [[at[id(w)] for w in cw] for cw in ws],
                [[-1 if b is None else at[id(b)] for b in cbw] for cbw in bws],
                [at[id(p)] for p in ps],
                [at[id(w)] for w in ns],
            )
        return True

    def replay(self, param_groups: list[dict[str, Any]], state: Any, counters: StepCounters) -> bool:
        """The step with the last compiled step's arguments and new gradients, when they are still
        valid (see :class:`_Replay`); ``False`` (and nothing done) otherwise."""
        r = self.last
        if r is None or _groups_key(param_groups) != r.groups:
            return False
        if not all(w.is_contiguous() for cw in r.ws for w in cw):
            return False  # the step that rebuilds the arguments refuses it by name
        grads = [p.grad for p in r.params]
        if [g is None for g in grads] != r.no_grad or grads[r.first].device != r.device:  # type: ignore[union-attr]
            return False
        for p, buf in r.buffers:
            st = state.get(p)
            if st is None or st.get("momentum_buffer") is not buf:
                return False
        gs = [[grads[i] for i in at] for at in r.g_at]
        bgs = [[None if i < 0 else grads[i] for i in at] for at in r.bg_at]
        pgs = [grads[i] for i in r.pg_at]
        ngs = [grads[i] for i in r.ng_at]
        tensors = counters.all_on(r.device)
        plain_args = (r.ps, pgs, r.pbufs, r.ptab)
        norm_args = (r.ns, ngs, r.nbufs, r.ntab)
        r.fn.replay(r.chains, r.ws, gs, r.bufs, r.bws, bgs, r.bbufs, r.hps, plain_args, norm_args, tensors)
        return True


def _buffer(state: Any, p: Tensor, hp: Hyper, made: list[tuple[Tensor, Tensor]]) -> tuple[Tensor | None, bool]:
    """``(buffer, existed)`` of a tensor: ``None`` without momentum, a new zero buffer (recorded in
    ``made``) on its first momentum step, viewed with the parameter's shape."""
    if hp.momentum == 0:
        return None, False
    st = state.get(p)
    buf = None if st is None else st.get("momentum_buffer")
    if buf is None:
        buf = torch.zeros_like(p, memory_format=torch.contiguous_format)
        made.append((p, buf))
        return buf, False
    return (buf if buf.shape == p.shape else buf.view(p.shape)), True
