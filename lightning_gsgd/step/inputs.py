"""What an optimizer hands to a step: the collected arguments, the counters, the per-chain caches.

Every form of the step (:func:`lightning_gsgd.step.eager.eager_step`,
:class:`lightning_gsgd.step.compiled.CompiledStep`) takes one :class:`StepArgs` and returns the
diagnostics readings it was asked for (or ``None``), so the optimizer dispatches once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_gsgd.step.hyper import Hyper, hyper
from lightning_gsgd.step.plan import ChainPlan, build_chain_plan
from lightning_gsgd.step.work import ChainWork
from lightning_gsgd.topology.types import Chain, ChainLayer, Topology, TopologyError

#: The step counters, in the order the compiled step takes them.
COUNTERS = ("steps", "skipped_steps", "guard_hits", "collapsed_steps")


class StepCounters:
    """The step counters as 0-d int64 tensors on the parameters' device (updated without host reads)."""

    def __init__(self) -> None:
        self.tensors: dict[str, Tensor] = {}

    def get(self, name: str, device: torch.device) -> Tensor:
        """The counter ``name`` on ``device`` (created at 0, or moved there), to be updated in place."""
        t = self.tensors.get(name)
        if t is None:
            t = torch.zeros((), dtype=torch.int64, device=device)
            self.tensors[name] = t
        elif t.device != device:
            t = t.to(device)
            self.tensors[name] = t
        return t

    def snapshot(self) -> dict[str, Tensor]:
        """Every counter of :data:`COUNTERS`, those not made yet as zeros beside the others."""
        device = next((t.device for t in self.tensors.values()), torch.device("cpu"))
        return {name: self.tensors.get(name, torch.zeros((), dtype=torch.int64, device=device)) for name in COUNTERS}

    def all_on(self, device: torch.device) -> list[Tensor]:
        """Every counter on ``device``, in the order of :data:`COUNTERS`."""
        return [self.get(name, device) for name in COUNTERS]


def check_contiguous(chain: Chain, name: str) -> None:
    """Refuse a chain whose weight is not contiguous (a ``channels_last`` conv weight).

    Raises:
        TopologyError: Names the layer.
    """
    for layer in chain.layers:
        if not layer.weight.is_contiguous():
            raise TopologyError(
                f"{name}: the weight of layer '{layer.name}' is not contiguous (channels_last memory format?); "
                "G-SGD steps contiguous weights only: use model.to(memory_format=torch.contiguous_format)"
            )


class ChainCaches:
    """Per chain: its index plan and its scratch memory, rebuilt only when the model moves device or dtype.

    Plans are built in :meth:`reset` (at ``bind``), outside the step, so that the step itself never
    copies host data to the device.
    """

    def __init__(self) -> None:
        self.plans: dict[int, ChainPlan] = {}
        self.work: dict[int, ChainWork] = {}

    def reset(self, topology: Topology) -> None:
        """Drop every cache and build the plans of ``topology``'s chains on their current device."""
        self.plans = {ci: build_chain_plan(c, c.layers[0].weight.device) for ci, c in enumerate(topology.chains)}
        self.work = {}

    def plan(self, ci: int, chain: Chain) -> ChainPlan:
        """The plan of chain ``ci`` on its weights' device (refuses a non-contiguous weight by name)."""
        check_contiguous(chain, "GSGD")  # every form reads each weight as rows of its contiguous layout
        w = chain.layers[0].weight
        plan = self.plans.get(ci)
        if plan is None or plan.device != w.device:
            plan = build_chain_plan(chain, w.device)
            self.plans[ci] = plan
        return plan

    def chain_work(self, ci: int, chain: Chain) -> ChainWork:
        """The scratch memory of chain ``ci`` for its weights' dtype and device."""
        w = chain.layers[0].weight
        plan = self.plan(ci, chain)
        work = self.work.get(ci)
        if work is None or not work.fits(plan, w.dtype, w.device):
            work = ChainWork(plan, w.dtype, w.device)
            self.work[ci] = work
        return work


@dataclass
class StepArgs:
    """One step's arguments, collected by the optimizer (see :func:`collect_step_args`).

    Attributes:
        chains: The topology's chains.
        bn_layers: BN-heuristic layers that have a gradient.
        normalized: S2 layers outside chains that have a gradient (:mod:`lightning_gsgd.step.normalized`).
        hp_of: Per parameter id, its hyper-parameters and its parameter group.
        plain: Parameters outside chains that have a gradient, with their hyper-parameters.
        param_groups: The optimizer's parameter groups.
        state: The optimizer's ``state`` (momentum buffers are read and written there).
        counters: The step counters.
        caches: The per-chain plans and scratch memory.
        device: The gradients' device.
        host_reads: Whether the step may read a device flag on the host (free on the CPU only); without
            it the step is computed on copies and applied with ``torch.where`` (no synchronization).
        readings: Whether the step should return the diagnostics readings of every chain it steps.
    """

    chains: tuple[Chain, ...]
    bn_layers: list[ChainLayer]
    normalized: list[ChainLayer]
    hp_of: dict[int, tuple[Hyper, dict[str, Any]]]
    plain: list[tuple[Tensor, Hyper]]
    param_groups: list[dict[str, Any]]
    state: Any
    counters: StepCounters
    caches: ChainCaches
    device: torch.device
    host_reads: bool
    readings: bool


def collect_params(
    param_groups: list[dict[str, Any]], in_chain: set[int], hyper_of: Callable[[dict[str, Any]], Any]
) -> tuple[dict[int, tuple[Any, dict[str, Any]]], list[tuple[Tensor, Any]], torch.device] | None:
    """What every optimizer's step reads off its parameter groups, in one pass.

    Args:
        param_groups: The optimizer's parameter groups.
        in_chain: Ids of the parameters a chain step owns.
        hyper_of: Maps a parameter group to its hyper-parameters (``Hyper``, ``AdamHyper``).

    Returns:
        ``(hp_of, plain, device)``: per parameter id its hyper-parameters and group; the parameters
        outside chains that have a gradient, with their hyper-parameters; the gradients' device.
        ``None`` when no parameter has a gradient.
    """
    hp_of: dict[int, tuple[Any, dict[str, Any]]] = {}
    device = None
    for g in param_groups:
        hp = hyper_of(g)
        for p in g["params"]:
            hp_of[id(p)] = (hp, g)
            if device is None and p.grad is not None:
                device = p.grad.device
    if device is None:
        return None
    plain = [
        (p, hp_of[id(p)][0]) for g in param_groups for p in g["params"] if p.grad is not None and id(p) not in in_chain
    ]
    return hp_of, plain, device


def collect_step_args(
    topology: Topology,
    param_groups: list[dict[str, Any]],
    state: Any,
    in_chain: set[int],
    counters: StepCounters,
    caches: ChainCaches,
    *,
    host_reads: bool | None,
    readings: bool,
) -> StepArgs | None:
    """Gather a step's arguments; ``None`` when no parameter has a gradient.

    Args:
        topology: The bound topology.
        param_groups: The optimizer's parameter groups.
        state: The optimizer's state.
        in_chain: Ids of the parameters the chain step owns (the rest take torch's SGD rule).
        counters: The optimizer's counters.
        caches: The optimizer's per-chain caches.
        host_reads: Whether device flags may be read on the host (``None``: on the CPU only).
        readings: Whether diagnostics readings are requested.
    """
    found = collect_params(param_groups, in_chain, hyper)
    if found is None:
        return None
    hp_of, plain, device = found
    return StepArgs(
        chains=topology.chains,
        bn_layers=[layer for layer in topology.bn_layers if layer.weight.grad is not None],
        normalized=[layer for layer in topology.normalized if layer.weight.grad is not None],
        hp_of=hp_of,
        plain=plain,
        param_groups=param_groups,
        state=state,
        counters=counters,
        caches=caches,
        device=device,
        host_reads=device.type == "cpu" if host_reads is None else host_reads,
        readings=readings,
    )
