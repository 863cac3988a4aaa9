"""``GSGD``: a ``torch.optim.Optimizer`` that runs SGD on the basis-path values of ReLU chains.

This module builds the optimizer, binds it to a topology and runs the step. Its counters and
saved state live in :mod:`lightning_gsgd._optim_state`, its steps of single parameters outside
chains and the masked writes in :mod:`lightning_gsgd._optim_param_steps` (mixins ``GSGD`` inherits).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_gsgd._optim_graph import GSGDGraphMixin
from lightning_gsgd._optim_param_steps import GSGDParamStepsMixin, keep, minmax, write
from lightning_gsgd._optim_state import GSGDStateMixin, refuse_foreign_state
from lightning_gsgd._sgd_common import begin_step, check_chain_params, check_contiguous, check_hyper, hyper
from lightning_gsgd.chain_graph import ChainGraphs, GraphChain
from lightning_gsgd.chain_plan import ChainPlan, build_chain_plan
from lightning_gsgd.chain_readings import ChainReading, collect_readings, update_after
from lightning_gsgd.chain_readings import supported as readings_supported
from lightning_gsgd.chain_step import Prepared, Slot, apply_chain, prepare_chain
from lightning_gsgd.chain_work import ChainWork
from lightning_gsgd.functional import Hyper
from lightning_gsgd.topology import Chain, Topology, TopologyError


class GSGD(GSGDStateMixin, GSGDParamStepsMixin, GSGDGraphMixin, Optimizer):
    """G-SGD (Meng et al., ICLR 2019): SGD in the positively scale-invariant space of a ReLU net.

    Parameters that belong to a ReLU chain of ``topology`` are updated by SGD on their basis-path
    values, with momentum and weight decay acting on path values and every sigma weight held
    fixed; every other parameter (and each chain's output bias) gets plain SGD with the same
    hyper-parameters, exactly like ``torch.optim.SGD``.

    Per-group hyper-parameters (``lr``, ``momentum``, ``dampening``, ``weight_decay``, ``nesterov``,
    ``min_ratio``) apply per layer, so LR schedulers work as usual.

    A step whose gradients contain NaN or inf is skipped as a whole (weights and momentum buffers
    untouched) and counted in :attr:`skipped_steps`; so is a step for which a hidden chain layer's
    per-unit sum ``sum(w * grad)`` is not finite (non-finite weights, or an overflow that would make
    the step itself non-finite). A step that would shrink a free tau path value below ``min_ratio``
    times its value (or flip its sign) is clamped there and counted in :attr:`guard_hits`. A guard
    that clamps the same path step after step shrinks it geometrically; a step whose O(H) per-unit
    factors (``F'``, ``1 / rho``, ``1 / F``, ``1 / (F F')``, new tau weights and momentum entries) are
    not finite, or whose new ``F'`` is so small that ``1 / F'**2`` is not (float32: ``F' < ~5.4e-20``),
    is skipped too and counted in :attr:`skipped_steps`, so the step never writes a non-finite weight
    from an underflowed path value. Training does not recover from that by itself (lower the lr or
    momentum, or resume from a checkpoint).

    Cost: the step is the cheap form of gsgd-math.md section 4b (SGD with a per-row/column
    preconditioner and a per-row rescale, a few in-place ``torch._foreach_*`` passes, plus one row
    reduction per hidden layer; ``compiled=True`` runs it as one generated graph); its
    state is the momentum buffers, as for ``torch.optim.SGD``. On the CPU, where reading a flag is
    free, a non-finite step is detected before anything is written; on accelerators ``step`` never
    reads a tensor value on the host (no synchronization): it computes the step on copies and
    applies it with ``torch.where``. Index tensors are built in :meth:`bind`
    (and once more, with one host-to-device copy, if the model later moves to another device).

    Args:
        params: Parameters or parameter groups, as for any torch optimizer.
        lr: Learning rate in path space.
        momentum: Momentum factor (buffer kept in path coordinates).
        dampening: Dampening for momentum.
        weight_decay: L2 penalty on path values (on weights for parameters outside chains).
        nesterov: Use Nesterov momentum.
        topology: The model's topology from :func:`lightning_gsgd.detect_topology`. May be left out
            and supplied later with :meth:`bind` (the Lightning callback and mixin do this).
        min_ratio: Guard on free tau path values: the smallest factor a step may shrink one by, in
            ``(0, 1)``.
        compiled: Run the whole step (every chain, and the parameters outside chains) as one graph
            compiled by ``torch.compile``: one pass over ``w``, ``grad`` and the buffer per tensor
            instead of five, and none of the eager step's ~20 small ops per layer (faster than
            ``torch.optim.SGD`` on large MLPs, about 1.5x it on a small CNN, against 1.4x and 3x
            eager; see benchmarks/README.md). The first step compiles it (seconds; a C++ compiler
            on the CPU, Triton on CUDA), and a new variant when which tensors have gradients or
            buffers changes; hyper-parameters enter as a tensor, so LR schedulers do not recompile.
            The step never reads a flag on the host, on any device. Steps that log path
            diagnostics and models with a BN-heuristic layer take the eager step. Results agree
            with the eager step to rounding, not bit for bit (also for parameters outside chains,
            which the eager step updates exactly like ``torch.optim.SGD``). Default ``False``.

    Example:
        >>> topo = detect_topology(model, example_input)  # doctest: +SKIP
        >>> init_skeleton_(topo)  # doctest: +SKIP
        >>> opt = GSGD(model.parameters(), lr=0.1, momentum=0.9, topology=topo)  # doctest: +SKIP
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        topology: Topology | None = None,
        min_ratio: float = 0.01,
        compiled: bool = False,
    ) -> None:
        if not isinstance(compiled, bool):
            raise TypeError(f"GSGD: compiled must be True or False, got {compiled!r}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "min_ratio": min_ratio,
        }
        _check_hyper(defaults, "GSGD")
        super().__init__(params, defaults)
        self.topology: Topology | None = None
        self._plans: dict[int, ChainPlan] = {}
        self._work: dict[int, ChainWork] = {}
        self._in_chain: set[int] = set()
        # Whether step() may read device flags on the host (None: only on the CPU, where it is free).
        # Tests set it to False to run the synchronization-free path on the CPU.
        self._host_reads: bool | None = None
        self._pending_fingerprint: list[Any] | None = None
        self._counters: dict[str, Tensor] = {}
        #: Whether the step runs as one ``torch.compile`` graph (see the class docstring).
        self.compiled = compiled
        self._graphs: ChainGraphs | None = None
        self._graph_chains: dict[int, tuple[ChainPlan, GraphChain]] = {}
        self._graph_tables: dict[int, tuple[list[list[float | Tensor]], Tensor]] = {}
        self._replay = None
        # Diagnostics by-products (PathDiagnostics on logging steps, see chain_readings.py): a request
        # for the next step only, and that step's readings per chain index.
        self._readings_request = False
        self._readings: dict[int, ChainReading] | None = None
        if topology is not None:
            self.bind(topology)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group, as torch's optimizers do, refusing bad hyper-parameters in it.

        Raises:
            ValueError: A hyper-parameter of the group is out of range (the message names it).
        """
        _check_hyper({**self.defaults, **param_group}, f"GSGD param group {len(self.param_groups)}")
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ binding
    def bind(self, topology: Topology) -> GSGD:
        """Attach the model's topology; every chain parameter must be in this optimizer.

        Args:
            topology: From :func:`lightning_gsgd.detect_topology` on the model being optimized.

        Returns:
            ``self``, for chaining.

        Raises:
            TopologyError: A chain parameter is not in this optimizer's parameter groups, is
                frozen, or is listed twice; or saved state does not fit the topology.
        """
        owned = check_chain_params(topology, self.param_groups, "GSGD")
        # --- BN heuristic (detect_topology(bn_mode="authors_heuristic")): bind check, see bn_heuristic.py
        for layer in getattr(topology, "bn_layers", ()):
            if id(layer.weight) not in owned or not layer.weight.requires_grad:
                raise TopologyError(
                    f"GSGD: the weight of BN-heuristic layer '{layer.name}' is not a trainable parameter "
                    "of this optimizer"
                )
        # --- end BN heuristic
        if self._pending_fingerprint is not None:
            refuse_foreign_state(self._pending_fingerprint, topology)
        self._pending_fingerprint = None
        self.topology = topology
        # Index plans are built here, outside step(), so that step() itself never copies host data
        # to the device (it rebuilds a plan only if the model moved to another device since).
        self._plans = {
            ci: build_chain_plan(chain, chain.layers[0].weight.device) for ci, chain in enumerate(topology.chains)
        }
        self._work = {}
        self._graph_chains = {}
        self._graph_tables = {}
        self._replay = None
        # Parameters the chain step owns; the output bias of a chain is no path value and takes the
        # plain SGD path like every other parameter outside chains.
        owned_by_chains = set()
        for chain in topology.chains:
            for l, layer in enumerate(chain.layers):
                owned_by_chains.add(id(layer.weight))
                if layer.bias is not None and l < len(chain.layers) - 1:
                    owned_by_chains.add(id(layer.bias))
        for layer in getattr(topology, "bn_layers", ()):
            owned_by_chains.add(id(layer.weight))
        self._in_chain = owned_by_chains
        return self

    @property
    def is_bound(self) -> bool:
        """Whether a topology is attached."""
        return self.topology is not None

    def _chain_plan(self, ci: int, chain: Chain) -> ChainPlan:
        check_contiguous(chain, "GSGD")  # both steps read each weight as rows of its contiguous layout
        w = chain.layers[0].weight
        plan = self._plans.get(ci)
        if plan is None or plan.device != w.device:
            plan = build_chain_plan(chain, w.device)
            self._plans[ci] = plan
        return plan

    def _chain_work(self, ci: int, chain: Chain) -> ChainWork:
        w = chain.layers[0].weight
        plan = self._chain_plan(ci, chain)
        work = self._work.get(ci)
        if work is None or not work.fits(plan, w.dtype, w.device):
            work = ChainWork(plan, w.dtype, w.device)
            self._work[ci] = work
        return work

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one G-SGD step.

        The step is skipped as a whole (counted in :attr:`skipped_steps`) when a gradient is not
        finite, when a per-node sum ``sum(w * grad)`` that the step needs is not (an overflow
        there would make the step non-finite too), or when an O(H) per-unit factor of the step is
        not finite or a new tau product ``F'`` falls below the floor (see the class docstring). On
        the CPU this is decided before anything is written; on other devices, where reading the
        flag would stall the host, the step is computed on copies and applied with ``torch.where``,
        so ``step`` never synchronizes with the device.

        Args:
            closure: Re-evaluates the model and returns the loss (run under ``torch.enable_grad``).

        Returns:
            The closure's loss, or ``None``.

        Raises:
            RuntimeError: The optimizer has no topology (see :meth:`bind`).
            TopologyError: A chain weight is not contiguous (a ``channels_last`` conv weight); the
                message names the layer.
        """
        loss = begin_step(
            closure,
            self.topology,
            "GSGD is not bound to a model: pass topology=detect_topology(model, example_input) to GSGD(...) "
            "or call optimizer.bind(topology); in Lightning, add lightning_gsgd.GSGDCallback() to "
            "Trainer(callbacks=[...]) (CLI: --trainer.callbacks+=lightning_gsgd.GSGDCallback) or list "
            "lightning_gsgd.GSGDMixin first among your LightningModule's base classes",
        )
        assert self.topology is not None
        if self.compiled and not self._readings_request and self._graph_replay():
            self._readings = None
            return loss
        hp_of: dict[int, tuple[Hyper, dict[str, Any]]] = {}
        device = None
        for g in self.param_groups:
            hp = hyper(g)
            for p in g["params"]:
                hp_of[id(p)] = (hp, g)
                if device is None and p.grad is not None:
                    device = p.grad.device
        if device is None:
            return loss
        # Reading a device flag costs nothing on the CPU; elsewhere it would stall the host.
        host_reads = device.type == "cpu" if self._host_reads is None else self._host_reads
        want = self._readings_request
        self._readings_request = False
        self._readings = None
        in_chain = self._in_chain
        plain = [
            (p, hp_of[id(p)][0])
            for g in self.param_groups
            for p in g["params"]
            if p.grad is not None and id(p) not in in_chain
        ]
        bn_layers = [layer for layer in getattr(self.topology, "bn_layers", ()) if layer.weight.grad is not None]
        if self.compiled and not want and not bn_layers:
            if self._graph_step(self.topology.chains, hp_of, plain, device, host_reads):
                return loss
        prepared: list[Prepared] = []
        checks: list[Tensor] = []
        chain_of: list[int] = []
        for ci, chain in enumerate(self.topology.chains):
            prep = self._prepare(ci, chain, hp_of, None if host_reads else False, want)
            if prep is not None:
                prepared.append(prep)
                chain_of.append(ci)
                checks.extend(prep.checks())
        checks.extend(minmax(p.grad) for p, _ in plain)
        checks.extend(minmax(layer.weight.grad) for layer in bn_layers)
        flags = torch.cat([c if c.device == device else c.to(device) for c in checks])
        ok = torch.isfinite(flags).all()
        skipped = self._counter("skipped_steps", device)
        if host_reads and not bool(ok):
            skipped += 1
            if want:
                self._readings = collect_readings(prepared, chain_of, None, None)
            return loss
        where_ok = None if host_reads else ok
        hits = self._counter("guard_hits", device)
        updates: list[Tensor] = []
        for prep in prepared:
            slots = prep.slots()
            for s in slots:
                if where_ok is not None:
                    s.target = s.param.clone()
                    s.buf_target = None if s.buf is None else s.buf.clone()
                else:
                    s.buf_target = s.buf
            chain_hits = apply_chain(prep)
            hits += chain_hits if where_ok is None else chain_hits * where_ok
            if want:
                updates.append(update_after(prep))
            for s in slots:
                if where_ok is not None:
                    write(s.param, s.target, where_ok)
                if s.buf_target is not None:
                    self.state[s.owner]["momentum_buffer"] = keep(s.buf_target, s.buf, where_ok)
        # --- BN heuristic (detect_topology(bn_mode="authors_heuristic")): dispatch, see bn_heuristic.py
        for layer in bn_layers:
            self._bn_heuristic_step(layer, hp_of[id(layer.weight)][0], where_ok)
        # --- end BN heuristic
        for p, hp in plain:
            self._plain_sgd(p, hp, where_ok)
        self._counter("steps", device).add_(1 if where_ok is None else where_ok.long())
        if want:
            self._readings = collect_readings(prepared, chain_of, updates, where_ok)
        if where_ok is not None:
            skipped += (~where_ok).long()
        return loss

    def _prepare(
        self,
        ci: int,
        chain: Chain,
        hp_of: dict[int, tuple[Hyper, dict[str, Any]]],
        unit_b: bool | None,
        readings: bool = False,
    ) -> Prepared | None:
        """Slots of a chain and phase one of its step; ``None`` when no layer has a gradient."""
        layers = chain.layers
        if all(layer.weight.grad is None for layer in layers):
            return None
        state = self.state
        weights: list[Slot] = []
        biases: list[Slot | None] = []
        last = len(layers) - 1
        for l, layer in enumerate(layers):
            w = layer.weight
            grad = w.grad if w.grad is not None else torch.zeros_like(w)
            st = state.get(w)
            buf = None if st is None else st.get("momentum_buffer")
            w3 = layer.weight3d()
            if buf is not None and buf.shape != w3.shape:
                buf = buf.view_as(w3)
            weights.append(Slot(w3, layer.weight3d(grad), hp_of[id(w)][0], buf, w3, owner=w))
            b = layer.bias
            if b is None or b.grad is None or l == last:
                biases.append(None)
            else:
                st = state.get(b)
                bbuf = None if st is None else st.get("momentum_buffer")
                biases.append(Slot(b, b.grad, hp_of[id(b)][0], bbuf, b, owner=b))
        min_ratio = hp_of[id(layers[0].weight)][1]["min_ratio"]
        work = self._chain_work(ci, chain)
        bias_params = None
        if readings and readings_supported([s.hp for s in [*weights, *biases] if s is not None], work.dtype):
            bias_params = [None if layer.bias is None else layer.bias.detach() for layer in layers]
        return prepare_chain(work, weights, biases, min_ratio, unit_b=unit_b, bias_params=bias_params)

    # ------------------------------------------------------------------ diagnostics by-products
    def _request_readings(self) -> bool:
        """Have the next :meth:`step` produce the diagnostics readings (``PathDiagnostics``; private).

        Returns ``False`` (and requests nothing) unless the step can read every chain: float32 or
        float64 parameters, and hyper-parameters :func:`lightning_gsgd.chain_readings.supported`
        covers. After that step, :attr:`_readings` maps a chain's index to its
        :class:`~lightning_gsgd.chain_readings.ChainReading` for every chain it stepped (a chain
        without gradients is left out, and everything when the step never ran). Costs nothing on
        other steps.
        """
        self._readings = None
        self._readings_request = False
        if self.topology is None:
            return False
        hp_of = {id(p): hyper(g) for g in self.param_groups for p in g["params"]}
        for chain in self.topology.chains:
            last = len(chain.layers) - 1
            tensors = [layer.weight for layer in chain.layers]
            tensors += [layer.bias for l, layer in enumerate(chain.layers) if layer.bias is not None and l < last]
            if not readings_supported([hp_of[id(t)] for t in tensors], tensors[0].dtype):
                return False
        self._readings_request = True
        return True


def _check_hyper(h: dict[str, Any], where: str) -> None:
    """Raise a ValueError naming the first out-of-range hyper-parameter of ``h``."""
    check_hyper(h, where)
    if not 0.0 < h["min_ratio"] < 1.0:
        raise ValueError(f"{where}: invalid min_ratio={h['min_ratio']}; it must be in (0, 1)")
