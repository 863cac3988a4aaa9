"""The G-SGD step on weights that FSDP2 (``fully_shard``) shards by rows (docs/math.md, "Sharded steps").

Every chain weight (and hidden bias) is a ``DTensor`` sharded on dim 0 over a 1-D mesh: each rank
holds a contiguous block of rows (``torch.chunk``'s split, the last ranks may hold fewer or none).
What a chain's step needs beyond the elementwise passes is O(H): the skeleton block (sigma and free
tau weights, gradients and buffer entries) and ``sum(w * g)`` per hidden row. Each rank reads the
entries that lie in its rows, and **one** ``all_gather`` per step (every chain batched, plus each
rank's finiteness flag) gives every rank the whole block. Every rank then computes the O(H) part
with the code of the unsharded step (:func:`lightning_gsgd.step.chain_step.solve_gathered`) from
identical numbers, so identical results, and writes the elementwise update into its own rows only.
No weight is ever gathered, and the decision to skip a step is the same on every rank.

Parameters outside chains get ``torch.optim.SGD``'s rule on their local shards (no communication).
Momentum buffers are DTensors sharded like their parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_gsgd.step.chain_step import solve_gathered
from lightning_gsgd.step.hyper import Hyper
from lightning_gsgd.step.inputs import StepArgs
from lightning_gsgd.step.passes import Item, bulk
from lightning_gsgd.step.single import all_finite, keep, minmax, plain_sgd_step, sgd_update_, write
from lightning_gsgd.step.slots import Prepared, Slot
from lightning_gsgd.topology.shard import is_dtensor, refuse_sharded_dags
from lightning_gsgd.topology.types import Chain, ChainLayer, Topology, TopologyError


def row_range(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rows ``[a, b)`` of ``n`` that rank ``rank`` of ``world`` holds under ``fully_shard`` (``torch.chunk``)."""
    size = -(-n // world)
    return min(rank * size, n), min((rank + 1) * size, n)


def check_row_sharded(topology: Topology, who: str) -> tuple[Any, torch.dtype]:
    """The one 1-D device mesh every chain weight and bias is sharded over by rows, and their dtype.

    Raises:
        TopologyError: A chain parameter is not sharded on dim 0 over one 1-D mesh shared by every chain,
            or chains differ in dtype (``who`` names the optimizer in the message); or the topology has
            DAG chains or BatchNorm segments (:func:`lightning_gsgd.topology.shard.refuse_sharded_dags`).
    """
    refuse_sharded_dags(topology, who)
    tensors = [t for c in topology.chains for layer in c.layers for t in (layer.weight, layer.bias) if t is not None]
    mesh = None
    for layer in (layer for c in topology.chains for layer in c.layers):
        for t in (layer.weight, layer.bias):
            if t is None:
                continue
            if not is_dtensor(t) or t.device_mesh.ndim != 1 or not t.placements[0].is_shard(0):
                raise TopologyError(
                    f"{who}: layer '{layer.name}' is not sharded by rows over a 1-D mesh (fully_shard on a 1-D "
                    "device mesh, every chain layer sharded); HSDP and tensor parallelism are not supported"
                )
            if mesh is None:
                mesh = t.device_mesh
            elif t.device_mesh != mesh:
                raise TopologyError(f"{who}: every chain layer must be sharded over the same device mesh")
    if len({t.dtype for t in tensors}) > 1:
        raise TopologyError(f"{who}: sharded chains must share one dtype")
    assert mesh is not None
    return mesh, tensors[0].dtype


@dataclass
class _ChainShard:
    """Where one chain's exchanged values come from and go to.

    ``rows[l]``: this rank's rows of layer ``l``; ``local_sel[l]`` / ``local_j[l]``: flat indices into
    this rank's block of layer ``l`` of the skeleton entries it holds, and their places in
    ``plan.sel[l]``; ``mine``: this rank's skeleton positions (all layers, in exchange order) and
    ``mine_rows``: its hidden rows (row numbering); ``offset``: where the chain's segment starts in
    every rank's vector. ``src_*`` / ``dst_*``: for the gathered ``[world * width]`` vector, which
    entries fill the skeleton block (weights, gradients, buffers) and which the per-row sums.
    """

    rows: list[tuple[int, int]]
    local_sel: list[Tensor]
    local_j: list[Tensor]
    offset: int
    n_skel: int
    src_w: Tensor
    src_g: Tensor
    src_m: Tensor
    dst_skel: Tensor
    src_rows: Tensor
    dst_rows: Tensor


class ShardedStep:
    """The step of a topology whose chain weights are row-sharded DTensors (built at ``bind``).

    Args:
        topology: The topology, re-pointed at the sharded model (:func:`lightning_gsgd.shard_topology`).
        caches: The optimizer's per-chain plans and work areas.

    Raises:
        TopologyError: A chain parameter is not sharded on dim 0 over one 1-D mesh shared by every chain,
            chains differ in dtype, or the topology has BN-heuristic layers.
    """

    def __init__(self, topology: Topology, caches: Any) -> None:
        if topology.bn_layers:
            raise TopologyError("GSGD: BN-heuristic layers (bn_mode='authors_heuristic') cannot be sharded")
        mesh, dtype = check_row_sharded(topology, "GSGD")
        self.group = mesh.get_group()
        self.world = mesh.size()
        self.rank = mesh.get_local_rank()
        self.dtype = dtype
        self.caches = caches
        self.chains = topology.chains
        #: Bytes of one step's all-gather (every rank's vector, as each rank receives it), and in total.
        self.bytes_per_step = 0
        self.bytes_total = 0
        self._build()

    def _build(self) -> None:
        """Lay out every rank's vector: per chain ``[w, g, buf]`` of its skeleton entries, its row sums."""
        lengths = [0] * self.world
        self.shards: list[_ChainShard] = []
        per_rank: list[list[tuple[int, Tensor, Tensor]]] = []  # per chain, per rank: (offset, skel pos, rows)
        for ci, chain in enumerate(self.chains):
            plan = self.caches.plan(ci, chain)
            self._check_local(chain)
            entries = []
            for r in range(self.world):
                pos, rows, sel_r, j_r, ranges = self._owned(plan, chain, r)
                if r == self.rank:
                    empty = [torch.empty(0, dtype=torch.long)] * 6
                    self.shards.append(_ChainShard(ranges, sel_r, j_r, lengths[r], pos.numel(), *empty))
                entries.append((lengths[r], pos, rows))
                lengths[r] += 3 * pos.numel() + rows.numel()
            per_rank.append(entries)
        self.width = max(lengths) + 2  # + each rank's [min, max] finiteness flag
        self.flag_at = self.width - 2
        dev = self.chains[0].layers[0].weight.device if self.chains else torch.device("cpu")
        for shard, entries in zip(self.shards, per_rank):
            src = {"w": [], "g": [], "m": [], "rows": []}
            dst_skel, dst_rows = [], []
            for r, (off, pos, rows) in enumerate(entries):
                base, n = r * self.width + off, pos.numel()
                ar = torch.arange(n)
                src["w"].append(base + ar)
                src["g"].append(base + n + ar)
                src["m"].append(base + 2 * n + ar)
                src["rows"].append(base + 3 * n + torch.arange(rows.numel()))
                dst_skel.append(pos)
                dst_rows.append(rows)
            shard.src_w, shard.src_g, shard.src_m = (torch.cat(src[k]).to(dev) for k in ("w", "g", "m"))
            shard.src_rows, shard.dst_skel = torch.cat(src["rows"]).to(dev), torch.cat(dst_skel).to(dev)
            shard.dst_rows = torch.cat(dst_rows).to(dev)
            shard.local_sel = [t.to(dev) for t in shard.local_sel]
            shard.local_j = [t.to(dev) for t in shard.local_j]

    def _owned(self, plan: Any, chain: Chain, r: int) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor], list]:
        """Rank ``r``'s skeleton positions, hidden rows, local flat indices, indices into ``sel[l]``, row ranges."""
        pos, rows, sel_r, j_r, ranges = [], [], [], [], []
        start = 0
        for l, layer in enumerate(chain.layers):
            a, b = row_range(layer.n_out, self.world, r)
            ranges.append((a, b))
            k = plan.row_size[l]
            sel = plan.sel[l].cpu()
            row = sel // k
            j = torch.nonzero((row >= a) & (row < b)).flatten()
            sel_r.append(sel[j] - a * k)
            j_r.append(j)
            pos.append(start + j)
            start += sel.numel()
            if l < plan.n_layers - 1:
                rows.append(plan.row_off[l] + torch.arange(a, b))
        return torch.cat(pos), torch.cat(rows), sel_r, j_r, ranges

    def _check_local(self, chain: Chain) -> None:
        for layer in chain.layers:
            a, b = row_range(layer.n_out, self.world, self.rank)
            for t in (layer.weight, layer.bias):
                if t is not None and t.to_local().shape[0] != b - a:
                    raise TopologyError(
                        f"GSGD: layer '{layer.name}' holds {t.to_local().shape[0]} rows on rank {self.rank}, not the "
                        f"{b - a} of fully_shard's even split; only fully_shard's default sharding is supported"
                    )

    # ------------------------------------------------------------------ the step
    def __call__(self, args: StepArgs) -> None:
        """One step of every tensor with a gradient, in place on this rank's rows (see the module docstring)."""
        device, state = args.device, args.state
        vec = torch.zeros(self.width, dtype=self.dtype, device=device)
        slots: list[tuple[list[Slot], list[Slot | None], bool] | None] = []
        local_checks: list[Tensor] = []
        for ci, chain in enumerate(self.chains):
            slots.append(self._gather_local(args, ci, chain, vec, local_checks))
        local_checks += [minmax(_local(p.grad)) for p, _ in args.plain if _local(p.grad).numel()]
        if local_checks:
            flags = torch.cat(local_checks)
            vec[self.flag_at], vec[self.flag_at + 1] = flags.min(), flags.max()
        out = torch.empty(self.world * self.width, dtype=self.dtype, device=device)
        dist.all_gather(list(out.view(self.world, self.width).unbind(0)), vec, group=self.group)
        self.bytes_per_step = out.numel() * out.element_size()
        self.bytes_total += self.bytes_per_step
        gathered_flags = out.view(self.world, self.width)[:, self.flag_at :].flatten()

        prepared: list[tuple[int, Prepared]] = []
        checks = [gathered_flags]
        for ci, item in enumerate(slots):
            if item is None:
                continue
            prep = self._solve(args, ci, out, gathered_flags, *item)
            prepared.append((ci, prep))
            checks += [*prep.input_checks(), *prep.factor_check_values()]
        # the gathered [min, max] of every rank's last-layer and outside-chain gradients: as in the
        # unsharded step, a skip with these finite is counted as a collapse
        inputs_ok = all_finite([gathered_flags], device)
        ok = inputs_ok & all_finite(checks, device)
        skipped = args.counters.get("skipped_steps", device)
        collapsed = args.counters.get("collapsed_steps", device)
        if args.host_reads and not bool(ok):
            skipped += 1
            collapsed += inputs_ok.long()
            return None
        where_ok = None if args.host_reads else ok
        hits = args.counters.get("guard_hits", device)
        for ci, prep in prepared:
            chain_hits = self._apply(ci, prep, state, where_ok)
            hits += chain_hits if where_ok is None else chain_hits * where_ok
        for p, hp in args.plain:
            if is_dtensor(p):
                _local_sgd_step(p, hp, state, where_ok)
            else:
                plain_sgd_step(p, hp, state, where_ok)
        args.counters.get("steps", device).add_(1 if where_ok is None else where_ok.long())
        if where_ok is not None:
            skipped += (~where_ok).long()
            collapsed += (inputs_ok & ~where_ok).long()
        return None

    def _gather_local(
        self, args: StepArgs, ci: int, chain: Chain, vec: Tensor, checks: list[Tensor]
    ) -> tuple[list[Slot], list[Slot | None], bool] | None:
        """This rank's slots of chain ``ci``; writes its skeleton entries and row sums into ``vec``."""
        layers = chain.layers
        if all(layer.weight.grad is None for layer in layers):
            return None
        shard, last = self.shards[ci], len(layers) - 1
        weights: list[Slot] = []
        biases: list[Slot | None] = []
        for l, layer in enumerate(layers):
            w = layer.weight
            wl = _rows3(layer, w.to_local())
            gl = _rows3(layer, _local(w.grad)) if w.grad is not None else torch.zeros_like(wl)
            buf = args.state.get(w, {}).get("momentum_buffer")
            weights.append(
                Slot(wl, gl, args.hp_of[id(w)][0], None if buf is None else _rows3(layer, _local(buf)), wl, owner=w)
            )
            b = layer.bias
            if b is None or b.grad is None or l == last:
                biases.append(None)
            else:
                bbuf = args.state.get(b, {}).get("momentum_buffer")
                bl = b.to_local()
                biases.append(
                    Slot(bl, _local(b.grad), args.hp_of[id(b)][0], None if bbuf is None else _local(bbuf), bl, owner=b)
                )
        momentum = any(s.hp.momentum != 0 for s in weights)
        n, at = shard.n_skel, shard.offset
        w_part, g_part, m_part = vec[at : at + n], vec[at + n : at + 2 * n], vec[at + 2 * n : at + 3 * n]
        k = 0
        rows_at = at + 3 * n
        for l, s in enumerate(weights):
            j = shard.local_sel[l].numel()
            w_part[k : k + j] = s.param.take(shard.local_sel[l])
            g_part[k : k + j] = s.grad.take(shard.local_sel[l])
            if momentum and s.buf is not None:
                m_part[k : k + j] = s.buf.take(shard.local_sel[l])
            k += j
            if l < last:
                a, b = shard.rows[l]
                sums = vec[rows_at : rows_at + b - a]
                if b > a:
                    torch.sum(torch.mul(s.param, s.grad), (1, 2), out=sums)
                    if biases[l] is not None:
                        sums.addcmul_(biases[l].param, biases[l].grad)  # type: ignore[union-attr]
                rows_at += b - a
        if weights[-1].grad.numel():
            checks.append(minmax(weights[-1].grad))
        return weights, biases, momentum

    def _solve(
        self,
        args: StepArgs,
        ci: int,
        out: Tensor,
        flags: Tensor,
        weights: list[Slot],
        biases: list[Slot | None],
        momentum: bool,
    ) -> Prepared:
        """Fill the chain's work area from the gathered vector and compute its O(H) part."""
        chain, shard = self.chains[ci], self.shards[ci]
        work = self.caches.chain_work(ci, chain)
        work.sw.index_copy_(0, shard.dst_skel, out.take(shard.src_w))
        work.sg.index_copy_(0, shard.dst_skel, out.take(shard.src_g))
        if momentum:
            work.sbuf.index_copy_(0, shard.dst_skel, out.take(shard.src_m))
        work.base.zero_()
        work.base.index_copy_(0, shard.dst_rows, out.take(shard.src_rows))
        min_ratio = args.hp_of[id(chain.layers[0].weight)][1]["min_ratio"]
        unit_b = None if args.host_reads else False
        return solve_gathered(work, weights, biases, momentum, flags, min_ratio, unit_b=unit_b)

    def _apply(self, ci: int, prep: Prepared, state: Any, ok: Tensor | None) -> Tensor:
        """Phase two on this rank's rows: the elementwise passes, then the skeleton entries it holds."""
        shard, work = self.shards[ci], prep.work
        plan = work.plan
        for s in prep.slots():
            if ok is not None:
                s.target = s.param.clone()
                s.buf_target = None if s.buf is None else s.buf.clone()
            else:
                s.buf_target = s.buf
        B = None if prep.unit_b else work.B_ext
        items: list[Item] = []
        L = plan.n_layers
        for l in range(L):
            a, b = shard.rows[l]
            row3 = {k: v[l][a:b] for k, v in work.row3.items()}
            row1 = {k: v[l][a:b] for k, v in work.row1.items()}
            rhoinv = row3["rhoinv"] if plan.is_hidden[l] else None
            if B is not None and plan.reads_hidden[l]:
                cols = plan.cols(B, l).view(1, -1, 1)
                items.append(Item(prep.weights[l], row3["r"], row3["F"], rhoinv, b=cols))
            else:
                items.append(Item(prep.weights[l], row3["r"], row3["F"], rhoinv, q=row3["q"], q2=row3["q2"]))
            bs = prep.biases[l]
            if bs is not None:
                items.append(Item(bs, row1["r"], row1["F"], row1["rhoinv"], q=row1["q"], q2=row1["q2"]))
        bulk(items)
        for l, s in enumerate(prep.weights):
            sel, j = shard.local_sel[l], shard.local_j[l]
            if sel.numel():
                s.target.view(-1).index_copy_(0, sel, work.sw_l[l].index_select(0, j))
                if s.buf_target is not None and prep.tau_buf:
                    s.buf_target.view(-1).index_copy_(0, sel, work.sbuf_l[l].index_select(0, j))
        for s in prep.slots():
            if ok is not None:
                write(s.param, s.target, ok)
            if s.buf_target is not None:
                _store_buf(state, s.owner, keep(s.buf_target, s.buf, ok), s.buf)
        return prep.hits


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor, or the tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def _rows3(layer: ChainLayer, t: Tensor) -> Tensor:
    """This rank's rows of a chain weight as ``[rows, n_in, taps]``."""
    return t.view(-1, layer.n_in, layer.taps)


def _store_buf(state: Any, owner: Any, new_local: Tensor, old_local: Tensor | None) -> None:
    """Keep ``state[owner]['momentum_buffer']`` a DTensor sharded like ``owner`` holding ``new_local``."""
    old = state[owner].get("momentum_buffer")
    if old is not None and new_local is old_local:
        return  # updated in place
    from torch.distributed.tensor import DTensor

    local = new_local.reshape(owner.to_local().shape)
    state[owner]["momentum_buffer"] = DTensor.from_local(
        local, owner.device_mesh, owner.placements, run_check=False, shape=owner.shape, stride=owner.stride()
    )


def _local_sgd_step(p: Tensor, hp: Hyper, state: Any, ok: Tensor | None) -> None:
    """torch.optim.SGD's rule on a sharded parameter outside chains, on its local shard (no communication)."""
    assert p.grad is not None
    pl = p.to_local()
    target = pl if ok is None else pl.clone()
    old = state[p].get("momentum_buffer") if hp.momentum != 0 else None
    old_l = None if old is None else old.to_local()
    buf = sgd_update_(
        pl, _local(p.grad), old_l if ok is None or old_l is None else old_l.clone(), hp, scratch=False, target=target
    )
    if buf is not None:
        _store_buf(state, p, keep(buf, old_l, ok), old_l)
    if ok is not None:
        write(pl, target, ok)
