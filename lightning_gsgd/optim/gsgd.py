"""``GSGD``: a ``torch.optim.Optimizer`` that runs SGD on the basis-path values of ReLU chains.

The class validates its arguments, binds a topology, and each step collects its arguments and
dispatches once to the eager or the compiled form of :mod:`lightning_gsgd.step`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from lightning_gsgd.optim.common import begin_step, chain_owned_ids, check_chain_params, check_hyper, g_step
from lightning_gsgd.optim.state import (
    COLLAPSED_STEPS,
    GUARD_HITS,
    SKIPPED_STEPS,
    STATE_KEY,
    STEPS,
    SavedState,
    restore_counters,
)
from lightning_gsgd.step.auto_compile import auto_compile
from lightning_gsgd.step.compiled import CompiledStep
from lightning_gsgd.step.eager import eager_step
from lightning_gsgd.step.graph import ChainGraphs
from lightning_gsgd.step.hyper import hyper
from lightning_gsgd.step.inputs import ChainCaches, StepArgs, StepCounters, collect_step_args
from lightning_gsgd.step.readings import supported as readings_supported
from lightning_gsgd.step.sharded import ShardedStep
from lightning_gsgd.step.slots import ChainReading
from lightning_gsgd.topology.shard import is_sharded
from lightning_gsgd.topology.types import Topology, TopologyError

log = logging.getLogger(__name__)

_UNBOUND = (
    "GSGD is not bound to a model: pass topology=detect_topology(model, example_input) to GSGD(...) "
    "or call optimizer.bind(topology); in Lightning, add lightning_gsgd.GSGDCallback() to "
    "Trainer(callbacks=[...]) (CLI: --trainer.callbacks+=lightning_gsgd.GSGDCallback) or list "
    "lightning_gsgd.GSGDMixin first among your LightningModule's base classes"
)

_COMPILED_SHARDED = (
    "GSGD(compiled=True) does not support sharded (fully_shard) weights; use compiled=False, which steps "
    "each rank's rows eagerly with one small all-gather per step"
)


class GSGD(Optimizer):
    """G-SGD (Meng et al., ICLR 2019): SGD in the positively scale-invariant space of a ReLU net.

    Parameters that belong to a ReLU chain of ``topology`` are updated by SGD on their basis-path
    values, with momentum and weight decay acting on path values and every sigma weight held
    fixed; every other parameter (and each chain's output bias) gets plain SGD with the same
    hyper-parameters, exactly like ``torch.optim.SGD``.

    Per-group hyper-parameters (``lr``, ``momentum``, ``dampening``, ``weight_decay``, ``nesterov``,
    ``min_ratio``) apply per layer, so LR schedulers work as usual.

    A step whose gradients, per-unit sums ``sum(w * grad)`` or O(H) per-unit factors are not finite
    is skipped as a whole (weights and momentum buffers untouched) and counted in
    :attr:`skipped_steps`; a step that would shrink a free tau path value below ``min_ratio`` times
    its value (or flip its sign) is clamped there and counted in :attr:`guard_hits` (docs/math.md,
    "Skipped steps and the guard"). A path the guard clamps step after step shrinks geometrically
    until its factors underflow and every step is skipped; training does not recover from that by
    itself (lower the lr or momentum, or resume from a checkpoint).

    The step is the cheap form of docs/math.md, "The cheap form"; the optimizer state is the momentum
    buffers, as for ``torch.optim.SGD``. On accelerators ``step`` never reads a tensor value on the
    host (see :attr:`host_reads`). Index tensors are built in :meth:`bind` (and once more if the model
    later moves to another device). Speed and memory against ``torch.optim.SGD`` are measured in
    ``benchmarks/README.md``.

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
            compiled by ``torch.compile``: one pass over ``w``, ``grad`` and the buffer per tensor.
            ``None`` (default) decides at :meth:`bind`: compiled when the chains hold at least 100,000
            parameters and a compiler is there (a C++ compiler on the CPU, Triton on CUDA), eager
            otherwise, with the reason in the log (:mod:`lightning_gsgd.step.auto_compile`); if
            compiling then fails, the eager step runs instead, with a warning. ``True`` / ``False``
            force one form. The first compiled step compiles the graph (seconds; logged), and a new
            variant when which tensors have gradients or buffers changes; hyper-parameters enter as a
            tensor, so LR schedulers do not recompile. Once compiled, the graph is called without
            Dynamo (:mod:`lightning_gsgd.step.direct_call`). The compiled step never reads a flag on the
            host, on any device. Steps that log path diagnostics and models with a BN-heuristic layer
            take the eager step. Results agree with the eager step to rounding, not bit for bit (also
            for parameters outside chains, which the eager step updates exactly like
            ``torch.optim.SGD``).

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
        compiled: bool | None = None,
    ) -> None:
        if compiled is not None and not isinstance(compiled, bool):
            raise TypeError(f"GSGD: compiled must be True or False (or None: decided at bind), got {compiled!r}")
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
        self._caches = ChainCaches()
        self._counters = StepCounters()
        self._compiled_step = CompiledStep(self._caches)
        self._sharded: ShardedStep | None = None
        self._in_chain: set[int] = set()
        #: Whether :meth:`step` may read a device flag on the host: ``None`` (default) only on the CPU,
        #: where it is free; ``False`` never, the synchronization-free path that accelerators take (the
        #: hook with which tests run that path on the CPU); ``True`` always.
        self.host_reads: bool | None = None
        self._saved = SavedState("GSGD", "sgd", own_moments_only=False)
        self._compiled = bool(compiled)
        self._auto = compiled is None
        # Diagnostics by-products (PathDiagnostics on logging steps, see step/readings.py): a request
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
        for layer in topology.bn_layers:  # detect_topology(bn_mode="authors_heuristic")
            if id(layer.weight) not in owned or not layer.weight.requires_grad:
                raise TopologyError(
                    f"GSGD: the weight of BN-heuristic layer '{layer.name}' is not a trainable parameter "
                    "of this optimizer"
                )
        self._saved.check_bind(topology)
        sharded = is_sharded(topology)
        if self._auto:
            self._compiled, why = (False, "the chain weights are sharded") if sharded else auto_compile(topology)
            log.info("GSGD: %s step (compiled=None): %s", "compiled" if self._compiled else "eager", why)
        elif sharded and self._compiled:
            raise TopologyError(_COMPILED_SHARDED)
        self.topology = topology
        self._caches.reset(topology)
        self._compiled_step.reset()
        self._sharded = ShardedStep(topology, self._caches) if sharded else None
        self._in_chain = chain_owned_ids(topology)
        return self

    @property
    def compiled(self) -> bool:
        """Whether the step runs as one ``torch.compile`` graph (see the class docstring); with
        ``compiled=None`` decided at :meth:`bind`. Setting it chooses the form from the next step on."""
        return self._compiled

    @compiled.setter
    def compiled(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"GSGD: compiled must be True or False, got {value!r}")
        self._compiled, self._auto = value, False

    @property
    def is_bound(self) -> bool:
        """Whether a topology is attached."""
        return self.topology is not None

    # ------------------------------------------------------------------ step
    @g_step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one G-SGD step, or skip it as a whole when it is not finite (see the class docstring;
        on accelerators without reading anything on the host).

        Args:
            closure: Re-evaluates the model and returns the loss (run under ``torch.enable_grad``).

        Returns:
            The closure's loss, or ``None``.

        Raises:
            RuntimeError: The optimizer has no topology (see :meth:`bind`).
            TopologyError: A chain weight is not contiguous (a ``channels_last`` conv weight); the
                message names the layer.
        """
        loss = begin_step(closure, self.topology, _UNBOUND)
        assert self.topology is not None
        want, self._readings_request, self._readings = self._readings_request, False, None
        if self._sharded is not None and self.compiled:
            raise TopologyError(_COMPILED_SHARDED)
        if self.compiled and not want and self._graph_replay():
            return loss
        args = collect_step_args(
            self.topology,
            self.param_groups,
            self.state,
            self._in_chain,
            self._counters,
            self._caches,
            host_reads=self.host_reads,
            readings=want,
        )
        if args is None:
            return loss
        if self._sharded is not None:  # row-sharded DTensors (FSDP2): step/sharded.py
            self._sharded(args)
            return loss
        # The compiled graph neither reads diagnostics nor steps BN-heuristic layers.
        if self.compiled and not want and not args.bn_layers:
            self._readings = self._compiled_or_eager(args)
        else:
            self._readings = eager_step(args)
        return loss

    def _compiled_or_eager(self, args: StepArgs) -> Any:
        """The compiled step; with ``compiled=None``, the eager one from now on if compiling fails here."""
        if not self._auto:
            return self._compiled_step(args)
        try:
            return self._compiled_step(args)
        except TopologyError:  # a weight the step cannot take (named): the eager step refuses it too
            raise
        except Exception as exc:  # torch.compile could not build the step (a compiler error, a missing tool)
            self._compiled = False
            log.warning("GSGD: compiling the step failed (%s: %s); running the eager step", type(exc).__name__, exc)
            return eager_step(args)

    def _graph_replay(self) -> bool:
        """Replay the last compiled step with the new gradients if its arguments still hold."""
        return self._compiled_step.replay(self.param_groups, self.state, self._counters)

    @property
    def _graphs(self) -> ChainGraphs | None:
        """The compiled variants of the step (``None`` before the first compiled step)."""
        return self._compiled_step.graphs

    @_graphs.setter
    def _graphs(self, graphs: ChainGraphs | None) -> None:  # tests choose the torch.compile backend here
        self._compiled_step.graphs = graphs

    @property
    def _replay(self) -> Any:
        """The last compiled step's arguments kept for a replay, or ``None``."""
        return self._compiled_step.last

    # ------------------------------------------------------------------ counters and state
    guard_hits = GUARD_HITS
    skipped_steps = SKIPPED_STEPS
    collapsed_steps = COLLAPSED_STEPS
    steps = STEPS

    def counters(self) -> dict[str, Tensor]:
        """The counters as 0-d int64 tensors on the parameters' device, updated in place by every step.

        Reading one as a number waits for the device (the properties above do); logging the tensors does
        not. Keys: ``steps``, ``skipped_steps``, ``guard_hits``, ``collapsed_steps``.
        """
        return self._counters.snapshot()

    @property
    def comm_bytes_per_step(self) -> int:
        """Bytes the last step exchanged between ranks (its one all-gather, as each rank receives it; 0
        unless the chain weights are sharded by ``fully_shard``). O(H) per chain: see docs/math.md,
        "Sharded steps"."""
        return 0 if self._sharded is None else self._sharded.bytes_per_step

    @property
    def comm_bytes_total(self) -> int:
        """Bytes exchanged by every step since :meth:`bind` (see :attr:`comm_bytes_per_step`)."""
        return 0 if self._sharded is None else self._sharded.bytes_total

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state plus :meth:`extra_state` under the key ``"gsgd"``."""
        sd = super().state_dict()
        sd[STATE_KEY] = self.extra_state()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state saved by :meth:`state_dict`; refuses state saved for another topology or by GAdam.

        Raises:
            TopologyError: The saved fingerprint (chain layer names and shapes) differs, or GAdam/GAdamW
                saved the state (its moments are no momentum buffers).
        """
        state_dict, extra = self._saved.accept(state_dict, self.topology)
        super().load_state_dict(state_dict)
        restore_counters(self._counters, extra)

    def extra_state(self) -> dict[str, Any]:
        """What G-SGD adds to torch's optimizer state: the topology fingerprint, a copy of the counters and
        the optimizer kind.

        torch's distributed optimizer state dict (``get_optimizer_state_dict``, used by Lightning's
        ``ModelParallelStrategy``) keeps only ``state`` and ``param_groups``; ``GSGDCallback`` then saves
        this itself.
        """
        return self._saved.extra(self.topology, self._counters)

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned: check the kind and the fingerprint, restore the counters.

        Raises:
            TopologyError: The saved fingerprint (chain layer names and shapes) differs, or GAdam/GAdamW
                saved it.
        """
        self._saved.accept({STATE_KEY: extra}, self.topology)
        restore_counters(self._counters, extra)

    # ------------------------------------------------------------------ diagnostics by-products
    def request_readings(self) -> bool:
        """Have the next :meth:`step` also produce the diagnostics readings of every chain.

        :class:`~lightning_gsgd.diagnostics.metrics.PathDiagnostics` calls this before a step it
        logs, then :meth:`last_readings` after it. The request holds for one step. Costs nothing on
        other steps; the step that takes it runs eagerly (not the compiled graph).

        Returns:
            Whether the request was taken: ``False`` (and nothing requested) unless the step can read
            every chain (float32 or float64 parameters, and hyper-parameters that
            :func:`lightning_gsgd.step.readings.supported` covers, no S2 layers, no tied parameters: those
            chains are read directly) or when no topology is bound.
        """
        self._readings = None
        self._readings_request = False
        if self.topology is None or self._sharded is not None:  # sharded: no readings yet
            return False
        if any(c.normalized or any(x.tied for x in c.layers) for c in self.topology.chains):  # read directly
            return False
        hp_of = {id(p): hyper(g) for g in self.param_groups for p in g["params"]}
        for chain in self.topology.chains:
            tensors = [layer.weight for layer in chain.layers]
            tensors += [layer.bias for layer, h in zip(chain.layers, chain.hidden) if layer.bias is not None and h]
            if not readings_supported([hp_of[id(t)] for t in tensors], tensors[0].dtype):
                return False
        self._readings_request = True
        return True

    def last_readings(self) -> dict[int, ChainReading] | None:
        """The readings of the step that took the last :meth:`request_readings`, by chain index.

        A chain without gradients is left out; ``None`` when no step ran since the request (AMP's
        ``GradScaler`` can skip one). Also withdraws a request that no step has taken, so that it does
        not carry over to a later step.
        """
        self._readings_request = False
        return self._readings


def _check_hyper(h: dict[str, Any], where: str) -> None:
    """Raise a ValueError naming the first out-of-range hyper-parameter of ``h``."""
    check_hyper(h, where)
    if not 0.0 < h["min_ratio"] < 1.0:
        raise ValueError(f"{where}: invalid min_ratio={h['min_ratio']}; it must be in (0, 1)")
