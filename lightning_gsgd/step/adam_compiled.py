"""The compiled G-Adam step (``GAdam(compiled=True)``): the glue around :mod:`lightning_gsgd.step.adam_graph`.

:class:`CompiledAdamStep` collects every chain tensor with its gradient, moments and ``step`` counter
(torch's Adam state, made as zeros where a tensor has none yet), the parameters outside chains, the
hyper-parameter tables (reused while their numbers do not change) and the counters, and runs the
compiled graph, which writes everything through ``torch.where`` on its ``ok`` flag. On the CPU that flag
is read afterwards (free there) when this step made state, so that a skipped first step leaves no state
behind, as in the eager step; on accelerators nothing is read and the step never synchronizes. A step
that makes no state leaves its arguments, all but the gradients, for the next step to replay
(:class:`_Replay`), as G-SGD's compiled step does, so that later steps skip this per-tensor Python while
nothing else changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_gsgd.step.adam import AdamStepArgs
from lightning_gsgd.step.adam_graph import (
    BETA1,
    BETA2,
    EPS,
    LR,
    MIN_RATIO,
    N_HP,
    WD,
    WD_DEC,
    AdamGraphs,
    Slot,
)
from lightning_gsgd.step.adam_rule import AdamHyper, ensure_state
from lightning_gsgd.step.compiled import HpTables, hp_table
from lightning_gsgd.step.graph_chain import GraphChain, graph_chain
from lightning_gsgd.step.plan import ChainPlan, build_chain_plan, hidden_biases
from lightning_gsgd.topology.types import Chain, Topology

_NO_ROW: list[float | Tensor] = [0.0] * N_HP


def _hp_row(hp: AdamHyper, min_ratio: float) -> list[float | Tensor]:
    """A row of the hyper-parameter table (:mod:`lightning_gsgd.step.adam_graph`) for one tensor."""
    row: list[float | Tensor] = [0.0] * N_HP
    row[LR] = hp.lr
    row[WD if not hp.decoupled else WD_DEC] = hp.weight_decay
    row[BETA1], row[BETA2], row[EPS], row[MIN_RATIO] = hp.beta1, hp.beta2, hp.eps, min_ratio
    return row


def _groups_key(groups: list[dict[str, Any]]) -> list[tuple[Any, ...]] | None:
    """What the step's tables and tensor lists depend on in the parameter groups (which parameters, the
    hyper-parameters); ``None`` when a group has a tensor lr, which may change in place."""
    key = []
    for g in groups:
        if isinstance(g["lr"], Tensor):
            return None
        params = g["params"]
        hp = (g["lr"], tuple(g["betas"]), g["eps"], g["weight_decay"], g["amsgrad"], g["decoupled_weight_decay"])
        key.append((id(params), len(params), *hp, g["min_ratio"]))
    return key


@dataclass
class _Replay:
    """The last compiled step's arguments, all but the gradients, and what they were built from.

    Valid while the parameter groups (:func:`_groups_key`), which parameters have a gradient, and every
    stepped tensor's state tensors are those of that step (``bind`` and ``load_state_dict`` drop it).
    """

    groups: list[tuple[Any, ...]]
    device: torch.device
    params: list[Tensor]  # every parameter of the optimizer, in group order
    no_grad: list[bool]
    first: int  # a parameter with a gradient (for the device check)
    held: list[tuple[Tensor, Slot]]  # (parameter, its slot): its state tensors must still be these
    fn: Any
    chains: list[GraphChain]
    ws: list[list[Slot]]
    bs: list[list[Slot | None]]
    hps: list[Tensor]
    plain: list[Slot]
    pnorm: tuple[bool, ...]
    ptab: Tensor
    at: dict[int, int]  # id of a stepped tensor -> its index in ``params``
    rows: list[list[list[float | Tensor]]]  # per table (the chains', then the plain parameters'), its rows
    row_group: list[list[int]]  # per table row, the index of its tensor's group (-1: an unused row)

    def slot(self, s: Slot, grads: list[Tensor | None]) -> Slot:
        """``s`` with its tensor's new gradient."""
        return (s[0], grads[self.at[id(s[0])]], *s[2:])  # type: ignore[return-value]


class CompiledAdamStep:
    """The G-Adam step as one ``torch.compile`` graph, with its caches: the compiled variants, each
    chain's index plan and graph description, and the hyper-parameter tables."""

    def __init__(self) -> None:
        self.graphs: AdamGraphs | None = None
        self._plans: dict[int, ChainPlan] = {}
        self._graph_chains: dict[int, tuple[ChainPlan, GraphChain]] = {}
        self._tables = HpTables(N_HP)
        self.last: _Replay | None = None

    def reset(self, topology: Topology) -> None:
        """Build the chains' index plans on their device (at ``bind``); forget the tables (the
        compiled variants stay)."""
        self._plans = {ci: build_chain_plan(c, c.layers[0].weight.device) for ci, c in enumerate(topology.chains)}
        self._graph_chains = {}
        self._tables = HpTables(N_HP)
        self.last = None

    def _graph_chain(self, ci: int, chain: Chain) -> GraphChain:
        device = chain.layers[0].weight.device
        plan = self._plans.get(ci)
        if plan is None or plan.device != device:
            plan = build_chain_plan(chain, device)
            self._plans[ci] = plan
        cached = self._graph_chains.get(ci)
        if cached is None or cached[0] is not plan:
            cached = (plan, graph_chain(plan, tuple(layer.centre for layer in chain.layers)))
            self._graph_chains[ci] = cached
        return cached[1]

    def replay(self, param_groups: list[dict[str, Any]], state: Any, counters: Any) -> bool:
        """The step with the last compiled step's arguments and new gradients, when they are still
        valid (see :class:`_Replay`); ``False`` (and nothing done) otherwise."""
        r = self.last
        if r is None:
            return False
        key = _groups_key(param_groups)
        if key != r.groups:
            if key is None or [g[:2] + g[3:] for g in key] != [g[:2] + g[3:] for g in r.groups]:
                return False
            self._new_lrs(r, [g[2] for g in key])  # only the lrs changed (a scheduler): new tables
            r.groups = key
        grads = [p.grad for p in r.params]
        if [g is None for g in grads] != r.no_grad or grads[r.first].device != r.device:  # type: ignore[union-attr]
            return False
        for p, (w, _, m, q, x, step) in r.held:
            st = state.get(p)
            if st is None or st.get("exp_avg") is not m or st.get("exp_avg_sq") is not q or st.get("step") is not step:
                return False
            if x is not None and st.get("max_exp_avg_sq") is not x:
                return False
            if not w.is_contiguous():
                return False  # the step that rebuilds the arguments refuses it by name
        ws = [[r.slot(s, grads) for s in cw] for cw in r.ws]
        bs = [[b if b is None or b[2] is None else r.slot(b, grads) for b in cb] for cb in r.bs]
        plain = [r.slot(s, grads) for s in r.plain]
        r.fn.replay(r.chains, ws, bs, r.hps, plain, r.pnorm, r.ptab, counters.all_on(r.device))
        return True

    def __call__(self, args: AdamStepArgs, param_groups: list[dict[str, Any]]) -> bool:
        """One step with the compiled graph; ``False`` (and nothing done) when no chain has a gradient
        (the eager step then updates the parameters outside chains). ``param_groups`` are the
        optimizer's, for the replay."""
        state, hp_of, device = args.state, args.hp_of, args.device
        made: list[tuple[Tensor, set[str]]] = []  # (parameter, state keys first made in this step)
        graph_chains: list[GraphChain] = []
        ws: list[list[Slot]] = []
        bs: list[list[Slot | None]] = []
        hps: list[Tensor] = []
        all_rows: list[list[list[float | Tensor]]] = []
        for ci, chain in enumerate(args.chains):
            layers = chain.layers
            if all(layer.weight.grad is None for layer in layers):
                continue
            graph_chains.append(self._graph_chain(ci, chain))
            min_ratio = hp_of[id(layers[0].weight)][1]["min_ratio"]
            cw: list[Slot] = []
            cb: list[Slot | None] = []
            rows: list[list[float | Tensor]] = []
            bias_rows: list[list[float | Tensor]] = []
            for layer in layers:
                w = layer.weight
                hp = hp_of[id(w)][0]
                cw.append(_slot(state, w, w.grad if w.grad is not None else torch.zeros_like(w), hp, made))
                rows.append(_hp_row(hp, min_ratio))
            for b in hidden_biases(chain):  # the layers' hidden biases, then the tied parameters
                if b is None:
                    cb.append(None)
                    bias_rows.append(_NO_ROW)
                elif b.grad is None:
                    cb.append((b, None, None, None, None, None))
                    bias_rows.append(_NO_ROW)
                else:
                    hpb = hp_of[id(b)][0]
                    cb.append(_slot(state, b, b.grad, hpb, made))
                    bias_rows.append(_hp_row(hpb, min_ratio))
            ws.append(cw)
            bs.append(cb)
            hps.append(self._tables.get(ci, rows + bias_rows, device))
            all_rows.append(rows + bias_rows)
        if not graph_chains:
            return False
        if self.graphs is None:
            self.graphs = AdamGraphs()
        # the S2 layers outside chains ride with the plain parameters, marked in pnorm
        outside = args.plain + [(layer.weight, hp_of[id(layer.weight)][0]) for layer in args.normalized]
        pnorm = (False,) * len(args.plain) + (True,) * len(args.normalized)
        plain = [_slot(state, p, p.grad, hp, made) for p, hp in outside]  # type: ignore[arg-type]
        prows = [_hp_row(hp, 0.0) for _, hp in outside]
        ptab = self._tables.get(-1, prows, device)
        fn = self.graphs.compiled_for(graph_chains, bs, ws, plain, pnorm)
        ok, _ = fn(graph_chains, ws, bs, hps, plain, pnorm, ptab, args.counters.all_on(device))
        self.last = None
        if made:
            if args.host_reads and not bool(ok):  # skipped: keep no state made for it (as the eager step)
                for p, keys in made:
                    st = state[p]
                    for k in keys:
                        del st[k]
                    if not st:
                        del state[p]
            return True
        groups = _groups_key(param_groups)
        if groups is not None and all(layer.weight.grad is not None for c in args.chains for layer in c.layers):
            params = [p for g in param_groups for p in g["params"]]
            stepped = [s for cw in ws for s in cw] + [b for cb in bs for b in cb if b is not None and b[1] is not None]
            stepped += plain
            self.last = _Replay(  # without the gradients, which the next backward pass may free
                groups,
                device,
                params,
                [p.grad is None for p in params],
                next(i for i, p in enumerate(params) if p.grad is not None),
                [(s[0], _no_grad(s)) for s in stepped],
                fn,
                graph_chains,
                [[_no_grad(s) for s in cw] for cw in ws],
                [[None if b is None else _no_grad(b) for b in cb] for cb in bs],
                hps,
                [_no_grad(s) for s in plain],
                pnorm,
                ptab,
                {id(p): i for i, p in enumerate(params)},
                [*all_rows, prows],
                _row_groups(param_groups, ws, bs, plain),
            )
        return True

    @staticmethod
    def _new_lrs(r: _Replay, lrs: list[float]) -> None:
        """Give the replay new hyper-parameter tables with the groups' new ``lrs`` (new tensors: the cached
        tables of :meth:`_table` keep their numbers)."""
        tables = []
        for rows, groups in zip(r.rows, r.row_group):
            rows = [
                row if g < 0 else [lrs[g] if j == LR else x for j, x in enumerate(row)] for row, g in zip(rows, groups)
            ]
            tables.append(rows)
        r.rows = tables
        r.hps = [hp_table(rows, r.device) for rows in tables[:-1]]
        if tables[-1]:
            r.ptab = hp_table(tables[-1], r.device)


def _row_groups(
    param_groups: list[dict[str, Any]], ws: list[list[Slot]], bs: list[list[Slot | None]], plain: list[Slot]
) -> list[list[int]]:
    """Per hyper-parameter table (each chain's: weights, then biases; then the plain parameters'), the
    group index of each row's tensor, -1 for a row no tensor reads (no bias, or one without gradient)."""
    group_of = {id(p): i for i, g in enumerate(param_groups) for p in g["params"]}
    tables = []
    for cw, cb in zip(ws, bs):
        rows = [group_of[id(s[0])] for s in cw]
        rows += [-1 if b is None or b[1] is None else group_of[id(b[0])] for b in cb]
        tables.append(rows)
    tables.append([group_of[id(s[0])] for s in plain])
    return tables


def _no_grad(s: Slot) -> Slot:
    return (s[0], None, *s[2:])  # type: ignore[return-value]


def _slot(state: Any, p: Tensor, grad: Tensor, hp: AdamHyper, made: list[tuple[Tensor, set[str]]]) -> Slot:
    """``(p, grad, exp_avg, exp_avg_sq, max_exp_avg_sq or None, step)`` of a tensor, its state made as
    zeros where missing (recorded in ``made``), its ``step`` on its device."""
    st = state[p]
    n = len(st)
    if n < 3 or (hp.amsgrad and "max_exp_avg_sq" not in st) or st["step"].device != p.device:
        before = set(st)
        ensure_state(st, p, hp, host_reads=False)
        if len(st) != n:
            made.append((p, set(st) - before))
    m, q = st["exp_avg"], st["exp_avg_sq"]
    x = st["max_exp_avg_sq"] if hp.amsgrad else None
    if m.shape != p.shape:  # state loaded from elsewhere in another shape: the graph reads it in p's
        m, q, x = m.view(p.shape), q.view(p.shape), None if x is None else x.view(p.shape)
    return p, grad, m, q, x, st["step"]
