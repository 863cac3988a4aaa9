"""The compiled G-Adam step (``GAdam(compiled=True)``): the glue around :mod:`lightning_gsgd.step.adam_graph`.

:class:`CompiledAdamStep` collects every chain tensor with its gradient, moments and ``step`` counter
(torch's Adam state, made as zeros where a tensor has none yet), the parameters outside chains, the
hyper-parameter tables (reused while their numbers do not change) and the counters, and runs the
compiled graph, which writes everything through ``torch.where`` on its ``ok`` flag. On the CPU that flag
is read afterwards (free there) when this step made state, so that a skipped first step leaves no state
behind, as in the eager step; on accelerators nothing is read and the step never synchronizes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_gsgd.step.adam import AdamStepArgs
from lightning_gsgd.step.adam_graph import BETA1, BETA2, EPS, LR, MIN_RATIO, N_HP, WD, WD_DEC, AdamGraphs, Slot
from lightning_gsgd.step.adam_rule import AdamHyper, ensure_state
from lightning_gsgd.step.compiled import _hp_table
from lightning_gsgd.step.graph_chain import GraphChain, graph_chain
from lightning_gsgd.step.plan import ChainPlan, build_chain_plan
from lightning_gsgd.topology.types import Chain, Topology

_NO_ROW: list[float | Tensor] = [0.0] * N_HP


def _hp_row(hp: AdamHyper, min_ratio: float) -> list[float | Tensor]:
    """A row of the hyper-parameter table (:mod:`lightning_gsgd.step.adam_graph`) for one tensor."""
    row: list[float | Tensor] = [0.0] * N_HP
    row[LR] = hp.lr
    row[WD if not hp.decoupled else WD_DEC] = hp.weight_decay
    row[BETA1], row[BETA2], row[EPS], row[MIN_RATIO] = hp.beta1, hp.beta2, hp.eps, min_ratio
    return row


class CompiledAdamStep:
    """The G-Adam step as one ``torch.compile`` graph, with its caches: the compiled variants, each
    chain's index plan and graph description, and the hyper-parameter tables."""

    def __init__(self) -> None:
        self.graphs: AdamGraphs | None = None
        self._plans: dict[int, ChainPlan] = {}
        self._graph_chains: dict[int, tuple[ChainPlan, GraphChain]] = {}
        self._tables: dict[int, tuple[list[list[float | Tensor]], Tensor]] = {}

    def reset(self, topology: Topology) -> None:
        """Build the chains' index plans on their device (at ``bind``); forget the tables (the
        compiled variants stay)."""
        self._plans = {ci: build_chain_plan(c, c.layers[0].weight.device) for ci, c in enumerate(topology.chains)}
        self._graph_chains = {}
        self._tables = {}

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

    def __call__(self, args: AdamStepArgs) -> bool:
        """One step with the compiled graph; ``False`` (and nothing done) when no chain has a gradient
        (the eager step then updates the parameters outside chains)."""
        state, hp_of, device = args.state, args.hp_of, args.device
        made: list[tuple[Tensor, set[str]]] = []  # (parameter, state keys first made in this step)
        graph_chains: list[GraphChain] = []
        ws: list[list[Slot]] = []
        bs: list[list[Slot | None]] = []
        hps: list[Tensor] = []
        for ci, chain in enumerate(args.chains):
            layers = chain.layers
            if all(layer.weight.grad is None for layer in layers):
                continue
            graph_chains.append(self._graph_chain(ci, chain))
            last = len(layers) - 1
            min_ratio = hp_of[id(layers[0].weight)][1]["min_ratio"]
            cw: list[Slot] = []
            cb: list[Slot | None] = []
            rows: list[list[float | Tensor]] = []
            bias_rows: list[list[float | Tensor]] = []
            for l, layer in enumerate(layers):
                w = layer.weight
                hp = hp_of[id(w)][0]
                cw.append(_slot(state, w, w.grad if w.grad is not None else torch.zeros_like(w), hp, made))
                rows.append(_hp_row(hp, min_ratio))
                b = layer.bias
                if b is None or l == last:
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
            hps.append(self._table(ci, rows + bias_rows, device))
        if not graph_chains:
            return False
        if self.graphs is None:
            self.graphs = AdamGraphs()
        plain = [_slot(state, p, p.grad, hp, made) for p, hp in args.plain]  # type: ignore[arg-type]
        prows = [_hp_row(hp, 0.0) for _, hp in args.plain]
        ptab = self._table(-1, prows, device) if prows else torch.zeros((0, N_HP), dtype=torch.float64, device=device)
        fn = self.graphs.compiled_for(graph_chains, bs, ws, plain)
        ok, _ = fn(graph_chains, ws, bs, hps, plain, ptab, args.counters.all_on(device))
        if made and args.host_reads and not bool(ok):  # skipped: keep no state made for it (as the eager step)
            for p, keys in made:
                st = state[p]
                for k in keys:
                    del st[k]
                if not st:
                    del state[p]
        return True

    def _table(self, ci: int, rows: list[list[float | Tensor]], device: torch.device) -> Tensor:
        """The chain's hyper-parameter table, reused while its numbers do not change."""
        cached = self._tables.get(ci)
        if cached is not None and cached[0] == rows and cached[1].device == device:
            return cached[1]
        table = _hp_table(rows, device)
        if not any(isinstance(x, Tensor) for row in rows for x in row):  # a tensor lr may change in place
            self._tables[ci] = (rows, table)
        return table


def _slot(state: Any, p: Tensor, grad: Tensor, hp: AdamHyper, made: list[tuple[Tensor, set[str]]]) -> Slot:
    """``(p, grad, exp_avg, exp_avg_sq, max_exp_avg_sq or None, step)`` of a tensor, its state made as
    zeros where missing (recorded in ``made``), its ``step`` on its device."""
    st = state[p]
    before = set(st)
    ensure_state(st, p, hp, host_reads=False)
    if len(st) != len(before):
        made.append((p, set(st) - before))
    shape = p.shape
    x = st["max_exp_avg_sq"].view(shape) if hp.amsgrad else None
    return p, grad, st["exp_avg"].view(shape), st["exp_avg_sq"].view(shape), x, st["step"]
