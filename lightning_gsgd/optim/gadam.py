"""``GAdam`` and ``GAdamW``: Adam and AdamW on the basis-path values of ReLU chains.

The classes validate their arguments as ``torch.optim.Adam`` does, bind a topology like ``GSGD``, and
each step collects its arguments and calls :func:`lightning_gsgd.step.adam.adam_step`
(docs/math.md, "Adam in path space").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from lightning_gsgd.optim.common import begin_step, chain_owned_ids, check_chain_params, g_step
from lightning_gsgd.optim.state import (
    COLLAPSED_STEPS,
    GUARD_HITS,
    SKIPPED_STEPS,
    STATE_KEY,
    STEPS,
    SavedState,
    restore_counters,
)
from lightning_gsgd.step.adam import AdamPlans, AdamStepArgs, adam_hyper, adam_step
from lightning_gsgd.step.adam_compiled import CompiledAdamStep
from lightning_gsgd.step.adam_graph import AdamGraphs
from lightning_gsgd.step.adam_sharded import ShardedAdamStep
from lightning_gsgd.step.auto_compile import auto_compile
from lightning_gsgd.step.inputs import StepCounters, check_contiguous, collect_params
from lightning_gsgd.topology.shard import is_sharded
from lightning_gsgd.topology.types import Topology, TopologyError

#: The value of ``state_dict()["gsgd"]["kind"]`` that marks state saved by GAdam/GAdamW.
STATE_KIND = "adam"

log = logging.getLogger(__name__)


def _unbound(name: str) -> str:
    return (
        f"{name} is not bound to a model: pass topology=detect_topology(model, example_input) to {name}(...) "
        "or call optimizer.bind(topology); in Lightning, add lightning_gsgd.GSGDCallback() to "
        "Trainer(callbacks=[...]) (CLI: --trainer.callbacks+=lightning_gsgd.GSGDCallback) or list "
        "lightning_gsgd.GSGDMixin first among your LightningModule's base classes"
    )


class GAdam(Optimizer):
    """Adam in the positively scale-invariant space of a ReLU net (G-space, Meng et al., ICLR 2019).

    Parameters that belong to a ReLU chain of ``topology`` are updated by Adam on their basis-path
    values: the moment estimates are kept in path coordinates (the same ``dL/dv`` G-SGD computes), the
    new path values are mapped back to weights holding every sigma weight fixed, and the result does
    not depend on how the hidden units are scaled. Every other parameter (and each chain's output
    bias) gets exactly ``torch.optim.Adam``'s rule (``AdamW``'s for :class:`GAdamW`) with the same
    hyper-parameters. The state has torch's keys and sizes (``step``, ``exp_avg``, ``exp_avg_sq``,
    ``max_exp_avg_sq`` with amsgrad); for chain parameters the moments are in path coordinates and 0
    at the sigma entries.

    Weight decay: with ``decoupled_weight_decay=False`` (Adam) it is an L2 penalty on path values,
    ``d = dL/dv + wd v``; with ``True`` (AdamW) every path value is multiplied by ``1 - lr wd``
    before the Adam step (docs/math.md, "Adam in path space").

    Skipped steps and the guard are those of :class:`~lightning_gsgd.GSGD`: a step whose gradients or
    O(H) factors are not finite is skipped as a whole and counted in :attr:`skipped_steps` (the eager
    step on the CPU decides before writing; on accelerators, and in the compiled step everywhere, it is
    applied with ``torch.where``, no host read); a step that
    would shrink a free tau path value below ``min_ratio`` times its value is clamped there and
    counted in :attr:`guard_hits`. A skipped step does not advance the per-parameter ``step``.

    Args:
        params: Parameters or parameter groups, as for any torch optimizer.
        lr: Learning rate (in path space for chain parameters).
        betas: Coefficients of the running averages of the gradient and its square.
        eps: Added to the denominator.
        weight_decay: Weight decay (see above).
        amsgrad: Use the AMSGrad variant.
        decoupled_weight_decay: AdamW's decoupled weight decay.
        topology: The model's topology from :func:`lightning_gsgd.detect_topology`; may be supplied
            later with :meth:`bind` (the Lightning callback and mixin do this).
        min_ratio: Guard on free tau path values, in ``(0, 1)``.
        compiled: Run the whole step (every chain, and the parameters outside chains) as one graph
            compiled by ``torch.compile`` (:mod:`lightning_gsgd.step.adam_graph`), as ``GSGD``'s
            ``compiled``: ``None`` (default) decides at :meth:`bind` (compiled when the chains hold at
            least 100,000 parameters and a compiler is there, else eager, with the reason in the log;
            if compiling then fails, the eager step runs instead, with a warning); ``True`` / ``False``
            force one form. Hyper-parameters and the bias corrections enter as tensors, so schedulers
            do not recompile. Results agree with the eager step to rounding, not bit for bit.
    """

    _name = "GAdam"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        decoupled_weight_decay: bool = False,
        topology: Topology | None = None,
        min_ratio: float = 0.01,
        compiled: bool | None = None,
    ) -> None:
        if compiled is not None and not isinstance(compiled, bool):
            raise TypeError(
                f"{self._name}: compiled must be True or False (or None: decided at bind), got {compiled!r}"
            )
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "decoupled_weight_decay": decoupled_weight_decay,
            "min_ratio": min_ratio,
        }
        check_adam_hyper(defaults, self._name)
        super().__init__(params, defaults)
        self.topology: Topology | None = None
        self._plans = AdamPlans()
        self._counters = StepCounters()
        self._in_chain: set[int] = set()
        self._sharded: ShardedAdamStep | None = None
        #: Whether :meth:`step` may read a device flag on the host: ``None`` (default) only on the CPU;
        #: ``False`` never (the accelerator path, which tests run on the CPU with it); ``True`` always.
        self.host_reads: bool | None = None
        self._saved = SavedState(self._name, STATE_KIND, own_moments_only=True)
        self._compiled_step = CompiledAdamStep()
        self._compiled = bool(compiled)
        self._auto = compiled is None
        if topology is not None:
            self.bind(topology)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group, refusing bad hyper-parameters in it.

        Raises:
            ValueError: A hyper-parameter of the group is out of range (the message names it).
        """
        check_adam_hyper({**self.defaults, **param_group}, f"{self._name} param group {len(self.param_groups)}")
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ binding
    def bind(self, topology: Topology) -> GAdam:
        """Attach the model's topology; every chain parameter must be in this optimizer.

        Returns:
            ``self``.

        Raises:
            TopologyError: A chain parameter is not in this optimizer, is frozen, the topology has
                BN-heuristic layers (SGD only), sharded weights that are not row-sharded over one 1-D mesh, or
                saved state does not fit the topology.
        """
        check_chain_params(topology, self.param_groups, self._name)
        if topology.bn_layers:
            raise TopologyError(
                f"{self._name}: the BN heuristic (bn_mode='authors_heuristic', layer '{topology.bn_layers[0].name}') "
                "is an SGD rule; detect the topology with bn_mode='sgd' to train those layers with plain Adam"
            )
        self._saved.check_bind(topology)
        if self._auto:
            self._compiled, why = auto_compile(topology)
            if is_sharded(topology) and self._compiled:  # the sharded step is eager (step/adam_sharded.py)
                self._compiled, why = False, "row-sharded (fully_shard) weights take the eager sharded step"
            log.info("%s: %s step (compiled=None): %s", self._name, "compiled" if self._compiled else "eager", why)
        elif self._compiled and is_sharded(topology):
            raise TopologyError(
                f"{self._name}(compiled=True) does not step row-sharded (fully_shard) weights; use compiled=False "
                "(or the default), which steps them eagerly with one small all-gather"
            )
        self.topology = topology
        self._plans.reset(topology)
        self._compiled_step.reset(topology)
        # row-sharded DTensors (FSDP2): step/adam_sharded.py
        self._sharded = ShardedAdamStep(topology, self._plans, self._name) if is_sharded(topology) else None
        self._in_chain = chain_owned_ids(topology)
        return self

    @property
    def is_bound(self) -> bool:
        """Whether a topology is attached."""
        return self.topology is not None

    @property
    def compiled(self) -> bool:
        """Whether the step runs as one ``torch.compile`` graph (with ``compiled=None`` decided at
        :meth:`bind`). Setting it chooses the form from the next step on."""
        return self._compiled

    @compiled.setter
    def compiled(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"{self._name}: compiled must be True or False, got {value!r}")
        self._compiled, self._auto = value, False

    @property
    def _graphs(self) -> AdamGraphs | None:
        """The compiled variants of the step (``None`` before the first compiled step)."""
        return self._compiled_step.graphs

    @_graphs.setter
    def _graphs(self, graphs: AdamGraphs | None) -> None:  # tests choose the torch.compile backend here
        self._compiled_step.graphs = graphs

    # ------------------------------------------------------------------ step
    @g_step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one G-space Adam step (see the class docstring for skipped steps and the guard).

        Args:
            closure: Re-evaluates the model and returns the loss (run under ``torch.enable_grad``).

        Returns:
            The closure's loss, or ``None``.

        Raises:
            RuntimeError: The optimizer has no topology (see :meth:`bind`).
            TopologyError: A chain weight is not contiguous.
        """
        loss = begin_step(closure, self.topology, _unbound(self._name))
        assert self.topology is not None
        if self._compiled and self._compiled_step.replay(self.param_groups, self.state, self._counters):
            return loss
        found = collect_params(self.param_groups, self._in_chain, adam_hyper)
        if found is None:
            return loss
        hp_of, plain, device = found
        for chain in self.topology.chains:
            check_contiguous(chain, self._name)
        for p, _ in plain:
            if p.grad.is_sparse:
                raise RuntimeError(f"{self._name} does not support sparse gradients")
        host_reads = device.type == "cpu" if self.host_reads is None else self.host_reads
        args = AdamStepArgs(
            chains=self.topology.chains,
            plans=self._plans,
            hp_of=hp_of,
            plain=plain,
            state=self.state,
            counters=self._counters,
            device=device,
            host_reads=host_reads,
            normalized=[layer for layer in self.topology.normalized if layer.weight.grad is not None],
        )
        if self._sharded is not None:
            self._sharded(args)
        elif not (self._compiled and self._compiled_or_eager(args)):
            adam_step(args)
        return loss

    def _compiled_or_eager(self, args: AdamStepArgs) -> bool:
        """The compiled step (``False``: no chain has a gradient, the eager step runs); with
        ``compiled=None``, the eager one from now on if compiling fails here."""
        if not self._auto:
            return self._compiled_step(args, self.param_groups)
        try:
            return self._compiled_step(args, self.param_groups)
        except Exception as exc:  # torch.compile could not build the step (a compiler error, a missing tool)
            self._compiled = False
            log.warning(
                "%s: compiling the step failed (%s: %s); running the eager step", self._name, type(exc).__name__, exc
            )
            return False

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
        """Bytes the last step exchanged between ranks, as each rank receives them (0 unless the chain
        weights are sharded by ``fully_shard``; O(H) per chain: docs/math.md, "Sharded steps")."""
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

    def extra_state(self) -> dict[str, Any]:
        """The counters, the topology fingerprint and the optimizer kind: what torch's distributed optimizer
        state dict (``get_optimizer_state_dict``) drops; save it beside a distributed checkpoint."""
        return self._saved.extra(self.topology, self._counters)

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned: check the kind and the fingerprint, restore the counters.

        Raises:
            TopologyError: Saved by another optimizer or for another topology.
        """
        self._saved.accept({STATE_KEY: extra}, self.topology)
        restore_counters(self._counters, extra)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state saved by :meth:`state_dict`; refuses state saved for another topology or optimizer.

        Raises:
            TopologyError: The saved fingerprint (chain layer names and shapes) differs, or the state
                holds moments that GAdam did not save (torch's Adam keeps them in weight coordinates,
                GSGD has momentum buffers).
        """
        state_dict, extra = self._saved.accept(state_dict, self.topology)
        super().load_state_dict(state_dict)
        restore_counters(self._counters, extra)


class GAdamW(GAdam):
    """AdamW in G-space: :class:`GAdam` with decoupled weight decay (every path value is multiplied by
    ``1 - lr wd`` before the Adam step; parameters outside chains get exactly ``torch.optim.AdamW``).

    Same arguments as :class:`GAdam`, with torch's AdamW default ``weight_decay=1e-2``.
    """

    _name = "GAdamW"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        topology: Topology | None = None,
        min_ratio: float = 0.01,
        compiled: bool | None = None,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            decoupled_weight_decay=True,
            topology=topology,
            min_ratio=min_ratio,
            compiled=compiled,
        )


def check_adam_hyper(h: dict[str, Any], where: str) -> None:
    """Raise a ValueError naming the first out-of-range Adam hyper-parameter of ``h`` (torch's ranges)."""
    lr = h["lr"]
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(f"{where}: a tensor lr must have exactly one element, got shape {tuple(lr.shape)}")
    if not 0.0 <= lr:
        raise ValueError(f"{where}: invalid learning rate lr={lr}; it must be >= 0")
    eps = h["eps"]
    if isinstance(eps, Tensor) or not 0.0 <= eps:
        raise ValueError(f"{where}: invalid eps={eps}; it must be a number >= 0")
    betas = h["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{where}: invalid betas={betas!r}; it must be a pair (beta1, beta2)")
    for i, beta in enumerate(betas):
        if isinstance(beta, Tensor) or not 0.0 <= beta < 1.0:
            raise ValueError(f"{where}: invalid betas[{i}]={beta}; it must be a number in [0, 1)")
    wd = h["weight_decay"]
    if isinstance(wd, Tensor) or not 0.0 <= wd:
        raise ValueError(f"{where}: invalid weight_decay={wd}; it must be a number >= 0")
    if not isinstance(h["amsgrad"], bool):
        raise ValueError(f"{where}: invalid amsgrad={h['amsgrad']!r}; it must be True or False")
    if not isinstance(h["decoupled_weight_decay"], bool):
        raise ValueError(
            f"{where}: invalid decoupled_weight_decay={h['decoupled_weight_decay']!r}; it must be True or False"
        )
    if not 0.0 < h["min_ratio"] < 1.0:
        raise ValueError(f"{where}: invalid min_ratio={h['min_ratio']}; it must be in (0, 1)")
