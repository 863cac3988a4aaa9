"""The G-space Adam step on row-sharded weights (FSDP2's ``fully_shard``; docs/math.md, "Sharded steps").

The pattern of the sharded G-SGD step (:mod:`lightning_gsgd.step.sharded`): what a chain's Adam step
needs beyond the elementwise passes is O(H), namely every layer's sigma and tau entries (weights and
gradients; the tau entries' ``exp_avg``, ``exp_avg_sq`` and ``max_exp_avg_sq``) and ``sum(w g)`` (plus
``bias * dL/dbias``) per hidden row. Each rank reads the entries of its own rows, and **one**
``all_gather`` per step (every chain batched, plus each rank's finiteness flags) gives every rank all of
them, laid out per layer as a compact skeleton vector (sigma entries, then tau entries). Every rank then
runs phase one of the unsharded step (:func:`lightning_gsgd.step.adam_chain.prepare_adam_chain`, given
the gathered row sums) on identical numbers, so with identical results and the same skip decision, and
phase two (:func:`lightning_gsgd.step.adam_chain.apply_adam_chain`) on its own rows, with its own tau and
sigma entries. No weight is gathered.

The state is torch's for DTensor parameters: ``exp_avg``, ``exp_avg_sq`` (``max_exp_avg_sq``) are
DTensors sharded like their parameter, ``step`` a plain 0-d tensor (as ``torch.optim.Adam`` keeps it
under FSDP2, so distributed checkpoints hold the same keys). Parameters outside chains get torch's Adam
rule on their local shards (no communication).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_gsgd.step.adam import AdamStepArgs
from lightning_gsgd.step.adam_chain import (
    AdamSlot,
    PreparedAdam,
    adam_chain_checks,
    apply_adam_chain,
    prepare_adam_chain,
)
from lightning_gsgd.step.adam_plan import AdamChainPlan, AdamPlans
from lightning_gsgd.step.adam_rule import (
    MOMENT_KEYS,
    AdamHyper,
    adam_tensor_step,
    ensure_state,
    plain_adam_step,
    tick,
)
from lightning_gsgd.step.adam_sharded_layout import FLAGS, ChainLayout, build_layouts
from lightning_gsgd.step.sharded import check_row_sharded, row_range
from lightning_gsgd.step.single import all_finite
from lightning_gsgd.topology.shard import is_dtensor
from lightning_gsgd.topology.types import Chain, Topology, TopologyError


class ShardedAdamStep:
    """The G-space Adam step of a topology whose chain weights are row-sharded DTensors (built at ``bind``).

    Args:
        topology: The topology, re-pointed at the sharded model (:func:`lightning_gsgd.shard_topology`).
        plans: The optimizer's per-chain index plans (whole layers; every rank holds them).
        name: The optimizer's name, for messages.

    Raises:
        TopologyError: A chain parameter is not sharded on dim 0 over one 1-D mesh shared by every chain,
            chains differ in dtype, or a rank holds other rows than ``fully_shard``'s even split.
    """

    def __init__(self, topology: Topology, plans: AdamPlans, name: str) -> None:
        mesh, self.dtype = check_row_sharded(topology, name)
        self.group = mesh.get_group()
        self.world = mesh.size()
        self.rank = mesh.get_local_rank()
        self.name = name
        self.plans = plans
        self.chains = topology.chains
        #: Bytes of one step's all-gather (every rank's vector, as each rank receives it), and in total.
        self.bytes_per_step = 0
        self.bytes_total = 0
        self._built: dict[bool, tuple[list[ChainLayout], int]] = {}
        self.check_rows()

    def _layouts(self, amsgrad: bool) -> tuple[list[ChainLayout], int]:
        """Every chain's layout on this rank and the width of every rank's vector (with or without ``max``)."""
        if amsgrad not in self._built:
            self._built[amsgrad] = build_layouts(self.chains, self.plans, self.world, self.rank, 3 if amsgrad else 2)
        return self._built[amsgrad]

    def check_rows(self) -> None:
        """Refuse a rank whose shards hold other rows than ``fully_shard``'s even split (``torch.chunk``)."""
        for chain in self.chains:
            for layer in chain.layers:
                a, b = row_range(layer.n_out, self.world, self.rank)
                for t in (layer.weight, layer.bias):
                    if t is not None and t.to_local().shape[0] != b - a:
                        raise TopologyError(
                            f"{self.name}: layer '{layer.name}' holds {t.to_local().shape[0]} rows on rank "
                            f"{self.rank}, not the {b - a} of fully_shard's even split; only fully_shard's "
                            "default sharding is supported"
                        )

    # ------------------------------------------------------------------ the step
    def __call__(self, args: AdamStepArgs) -> None:
        """One step of every tensor with a gradient, in place on this rank's rows (see the module docstring)."""
        device, state, host_reads = args.device, args.state, args.host_reads
        amsgrad = any(hp.amsgrad for hp, _ in args.hp_of.values())
        layouts, width = self._layouts(amsgrad)
        n_moments = 3 if amsgrad else 2
        vec = torch.zeros(width, dtype=self.dtype, device=device)
        inputs: list[Tensor] = []
        others: list[Tensor] = []
        active = []
        for ci, chain in enumerate(self.chains):
            if all(layer.weight.grad is None for layer in chain.layers):
                continue
            active.append(ci)
            self._write_local(args, chain, layouts[ci], vec, n_moments, others)
            g_last = _local(chain.layers[-1].weight.grad)
            if g_last is not None and g_last.numel():
                inputs.append(g_last.reshape(-1))
        inputs += [_local(p.grad).reshape(-1) for p, _ in args.plain if _local(p.grad).numel()]
        for at, local in ((width - 4, inputs), (width - 2, others)):
            if local:
                lo, hi = torch.aminmax(torch.cat(local))
                vec[at], vec[at + 1] = lo, hi
        out = torch.empty(self.world * width, dtype=self.dtype, device=device)
        dist.all_gather(list(out.view(self.world, width).unbind(0)), vec, group=self.group)
        self.bytes_per_step = out.numel() * out.element_size()
        self.bytes_total += self.bytes_per_step
        flags = out.view(self.world, width)[:, width - FLAGS :]
        in_flags = flags[:, :2].flatten()

        prepared = [(ci, self._solve(args, ci, layouts[ci], out, n_moments)) for ci in active]
        checks = [adam_chain_checks(prep) for _, prep in prepared] + [flags.flatten()]
        skipped = args.counters.get("skipped_steps", device)
        collapsed = args.counters.get("collapsed_steps", device)  # skipped with finite gradients: a collapse
        ok = all_finite(checks, device)
        inputs_ok = all_finite([in_flags], device)
        if host_reads and not bool(ok):
            skipped += 1
            collapsed += inputs_ok.long()
            return
        where_ok = None if host_reads else ok
        hits = args.counters.get("guard_hits", device)
        for ci, prep in prepared:
            chain_hits = self._apply(args, self.chains[ci], layouts[ci], prep, where_ok)
            hits += chain_hits if where_ok is None else chain_hits * where_ok
        for p, hp in args.plain:
            if is_dtensor(p):
                _local_adam_step(p, hp, state, host_reads, where_ok)
            else:
                plain_adam_step(p, hp, state, host_reads, where_ok)
        args.counters.get("steps", device).add_(1 if where_ok is None else where_ok.long())
        if where_ok is not None:
            skipped += (~where_ok).long()
            collapsed += (inputs_ok & ~where_ok).long()

    def _write_local(
        self, args: AdamStepArgs, chain: Chain, lay: ChainLayout, vec: Tensor, n_moments: int, others: list[Tensor]
    ) -> None:
        """Write this rank's skeleton entries, tau moments and row sums of ``chain`` into ``vec``."""
        n, nt, last = lay.n_own, lay.n_own_tau, len(chain.layers) - 1
        w_part, g_part = vec[lay.offset : lay.offset + n], vec[lay.offset + n : lay.offset + 2 * n]
        m_at = lay.offset + 2 * n
        rows_at = m_at + n_moments * nt
        k = kt = 0
        for l, layer in enumerate(chain.layers):
            w = layer.weight.to_local()
            g = _local(layer.weight.grad)
            g = torch.zeros_like(w) if g is None else g
            for locs in (lay.sig_local[l], lay.tau_local[l]):
                j = locs.numel()
                w_part[k : k + j] = w.reshape(-1).take(locs)
                g_part[k : k + j] = g.reshape(-1).take(locs)
                k += j
            j = lay.tau_local[l].numel()
            st = args.state.get(layer.weight) or {}
            for mi, key in enumerate(MOMENT_KEYS[:n_moments]):
                t = st.get(key)
                if t is not None and j:
                    at = m_at + mi * nt + kt
                    vec[at : at + j] = t.to_local().reshape(-1).take(lay.tau_local[l])
            kt += j
            if l < last:
                a, b = lay.rows[l]
                if b > a:
                    row = torch.linalg.vecdot(w.flatten(1), g.flatten(1))
                    bias = layer.bias
                    if bias is not None and bias.grad is not None:
                        gb = _local(bias.grad)
                        row = row + bias.to_local() * gb
                        others.append(gb.reshape(-1))
                    vec[rows_at : rows_at + b - a] = row
                rows_at += b - a

    def _solve(self, args: AdamStepArgs, ci: int, lay: ChainLayout, out: Tensor, n_moments: int) -> PreparedAdam:
        """Phase one of chain ``ci`` on the gathered compact skeleton and row sums (identical on every rank)."""
        chain = self.chains[ci]
        assert lay.src is not None and lay.dst_rows is not None
        compact = {}
        for key in ("w", "g", *MOMENT_KEYS[:n_moments]):
            t = torch.zeros(lay.n_compact, dtype=self.dtype, device=out.device)
            dst = lay.dst_wg if key in ("w", "g") else lay.dst_tau
            compact[key] = t.index_copy_(0, dst, out.take(lay.src[key]))
        rows = torch.zeros(lay.n_rows, dtype=self.dtype, device=out.device).index_copy_(
            0, lay.dst_rows, out.take(lay.src["rows"])
        )
        weights, cstate, row_sums, sig_flat, tau_flat = [], {}, [], [], []
        for l, layer in enumerate(chain.layers):
            w = layer.weight
            a, size = lay.start[l], lay.n_sig[l] + lay.n_tau[l]
            sl = slice(a, a + size)
            hp = args.hp_of[id(w)][0]
            weights.append(AdamSlot(compact["w"][sl].view(1, -1), w, compact["g"][sl].view(1, -1), hp))
            real = args.state.get(w) or {}
            cstate[w] = {"step": real.get("step"), **{k: compact[k][sl] for k in MOMENT_KEYS[:n_moments]}}
            row_sums.append(rows[lay.hoff[l] : lay.hoff[l] + layer.n_out])
            sig_flat.append(None if lay.n_sig[l] == 0 else torch.arange(lay.n_sig[l], device=out.device))
            tau_flat.append(None if lay.n_tau[l] == 0 else lay.n_sig[l] + torch.arange(lay.n_tau[l], device=out.device))
        full = self.plans.plan(ci, chain)
        plan = AdamChainPlan(full.device, full.index, sig_flat, tau_flat)
        min_ratio = args.hp_of[id(chain.layers[0].weight)][1]["min_ratio"]
        return prepare_adam_chain(
            plan,
            weights,
            [None] * len(weights),
            cstate,
            min_ratio,
            host_reads=args.host_reads,
            row_sums=row_sums,
            local_rows=lay.rows,
        )

    def _apply(
        self, args: AdamStepArgs, chain: Chain, lay: ChainLayout, prep: PreparedAdam, ok: Tensor | None
    ) -> Tensor:
        """Phase two on this rank's rows, with its own tau and sigma entries; returns the guard's hits."""
        state, host_reads = args.state, args.host_reads
        L = len(chain.layers)
        weights, biases, local_state = [], [], {}
        tau_new, sig_w, sig_flat, tau_flat, s_bias, rhoinv = [], [], [], [], [], []
        for l, layer in enumerate(chain.layers):
            a, b = lay.rows[l]
            w = layer.weight
            slot = prep.weights[l]
            weights.append(
                _local_slot(w, w.to_local().view(-1, layer.n_in, layer.taps), _local(w.grad), slot.hp, slot.tick)
            )
            local_state[w] = _local_state(state, w, slot.hp, host_reads)
            bias = layer.bias
            if bias is None or l == L - 1:
                biases.append(None)
            else:
                hp = args.hp_of[id(bias)][0]
                st = (state.get(bias) or {}).get("step")
                grad = _local(bias.grad)
                local = bias.to_local()
                biases.append(AdamSlot(local, bias, grad, hp, tick(hp, st, local, host_reads)))
                if grad is not None:
                    local_state[bias] = _local_state(state, bias, hp, host_reads)
            entry = prep.tau_new[l]
            tau_new.append(None if entry is None else tuple(None if t is None else t[lay.tau_j[l]] for t in entry))
            sw = prep.sig_w[l]
            sig_w.append(None if sw is None else sw[lay.sig_j[l]])
            sig_flat.append(None if prep.plan.sig_flat[l] is None else lay.sig_local[l])
            tau_flat.append(None if prep.plan.tau_flat[l] is None else lay.tau_local[l])
            s_bias.append(prep.s_bias[l][a:b])
            ri = prep.rhoinv[l]
            rhoinv.append(None if ri is None else ri[a:b])
        plan = AdamChainPlan(prep.plan.device, prep.plan.index, sig_flat, tau_flat)
        local = PreparedAdam(plan, weights, biases, prep.s, s_bias, rhoinv, tau_new, sig_w, hits=prep.hits)  # type: ignore[arg-type]
        return apply_adam_chain(local, local_state, host_reads, ok)


def _local(t: Tensor | None) -> Tensor | None:
    """The local shard of a DTensor, or the tensor itself."""
    if t is None:
        return None
    return t.to_local() if is_dtensor(t) else t


def _local_slot(owner: Tensor, param: Tensor, grad: Tensor | None, hp: AdamHyper, t: Any) -> AdamSlot:
    """A weight's slot on this rank's rows (a gradient of zeros where the weight had none)."""
    g = torch.zeros_like(param) if grad is None else grad.view_as(param)
    return AdamSlot(param, owner, g, hp, t)


def _local_state(state: Any, p: Tensor, hp: AdamHyper, host_reads: bool) -> dict[str, Tensor]:
    """Torch's Adam state of the DTensor ``p`` (made if missing), as its local shards; ``step`` shared."""
    st = state[p]
    ensure_state(st, p, hp, host_reads)
    return {k: (v.to_local() if is_dtensor(v) else v) for k, v in st.items()}


def _local_adam_step(p: Tensor, hp: AdamHyper, state: Any, host_reads: bool, ok: Tensor | None) -> None:
    """torch's Adam/AdamW rule on a sharded parameter outside chains, on its local shard (no communication);
    the operations of :func:`lightning_gsgd.step.adam_rule.plain_adam_step`."""
    assert p.grad is not None
    adam_tensor_step(_local_state(state, p, hp, host_reads), p.to_local(), p.grad.to_local(), hp, host_reads, ok)
