"""The index plan of one chain's G-space Adam step: where its sigma and tau entries lie.

Built from :func:`lightning_gsgd.topology.index.chain_index` (the one place the basis is chosen), at
``bind`` and again only when a chain moves to another device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_gsgd.step.plan import tied_layers
from lightning_gsgd.topology.index import LayerIndex, chain_index
from lightning_gsgd.topology.types import Chain, Topology


@dataclass(frozen=True)
class AdamChainPlan:
    """Index tensors of one chain on one device.

    Attributes:
        device: Where the indices live.
        index: Per layer, its sigma/tau index (:func:`lightning_gsgd.topology.index.chain_index`).
        sig_flat: Per layer, flat positions of the sigma entries in the weight (``None`` on output layers).
        tau_flat: Per layer, flat positions of the tau entries it holds (``LayerIndex.tau_nodes``
            order; ``None`` where it holds none).
        normalized: The chain's S2 layers (``Chain.normalized``).
        tied_layer: Per tied parameter (``ChainLayer.tied``, layer by layer), the layer it is a hidden
            bias of.
    """

    device: torch.device
    index: list[LayerIndex]
    sig_flat: list[Tensor | None]
    tau_flat: list[Tensor | None]
    normalized: tuple[int, ...] = ()
    tied_layer: tuple[int, ...] = ()


def build_adam_plan(chain: Chain, device: torch.device) -> AdamChainPlan:
    """The index tensors of ``chain`` on ``device``."""
    index = chain_index(chain, device)
    sig_flat: list[Tensor | None] = []
    tau_flat: list[Tensor | None] = []
    for layer, idx in zip(chain.layers, index):
        row = layer.n_in * layer.taps
        if idx.sig_rows is not None:
            assert idx.sig_cols is not None
            sig_flat.append(idx.sig_rows * row + idx.sig_cols * layer.taps + layer.centre)
        else:
            sig_flat.append(None)
        if idx.tau_rows is not None:
            assert idx.tau_cols is not None
            tau_flat.append(idx.tau_rows * row + idx.tau_cols * layer.taps + layer.centre)
        else:
            tau_flat.append(None)
    return AdamChainPlan(device, index, sig_flat, tau_flat, tuple(chain.normalized), tied_layers(chain))


class AdamPlans:
    """Per chain, its plan, built at ``bind`` and again only if the chain moves to another device."""

    def __init__(self) -> None:
        self.plans: dict[int, AdamChainPlan] = {}

    def reset(self, topology: Topology) -> None:
        """Build the plans of ``topology``'s chains on their current device."""
        self.plans = {ci: build_adam_plan(c, c.layers[0].weight.device) for ci, c in enumerate(topology.chains)}

    def plan(self, ci: int, chain: Chain) -> AdamChainPlan:
        """The plan of chain ``ci`` on its weights' device."""
        device = chain.layers[0].weight.device
        plan = self.plans.get(ci)
        if plan is None or plan.device != device:
            plan = build_adam_plan(chain, device)
            self.plans[ci] = plan
        return plan
