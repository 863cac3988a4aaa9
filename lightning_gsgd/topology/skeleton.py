"""Weight-space operations on a topology: skeleton initialization and positive rescaling."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_gsgd.topology.index import chain_index
from lightning_gsgd.topology.types import Chain, Topology


@torch.no_grad()
def init_skeleton_(topology: Topology, value: float = 1.0) -> None:
    """Set every sigma and tau weight of every chain to ``value`` (in place).

    G-SGD's path-space step scales like ``lr / v**2``; from PyTorch's default initialization the
    path values of a deep net are tiny and G-SGD diverges (docs/math.md, "Skeleton initialisation"). The authors'
    code therefore sets the skeleton weights to 1 at construction, and so does this function.

    This **changes the function the network computes**: call it once, before training from
    scratch, never when resuming.

    Args:
        topology: Chains of the model to initialize.
        value: The skeleton weight value (must be positive).
    """
    if value <= 0:
        raise ValueError(f"init_skeleton_: value must be positive, got {value}")
    for chain in topology.chains:
        for layer, idx in zip(chain.layers, chain_index(chain, layer_device(chain))):
            w3 = layer.weight3d()
            if idx.sig_rows is not None:
                w3[idx.sig_rows, idx.sig_cols, idx.centre] = value
            if idx.tau_rows is not None:
                w3[idx.tau_rows, idx.tau_cols, idx.centre] = value


def layer_device(chain: Chain) -> torch.device:
    """Where the chain's first weight lives."""
    return chain.layers[0].weight.device


@torch.no_grad()
def rescale_hidden_units_(topology: Topology, factors: list[list[Tensor]]) -> None:
    """Apply the positive scaling ``g_c`` to every hidden node (in place; the function is unchanged).

    Hidden node ``j`` of layer ``l`` gets its incoming weights and bias multiplied by
    ``factors[chain][l][j]`` and its outgoing weights divided by it.

    Args:
        topology: Chains of the model.
        factors: Per chain, one positive ``[n_out]`` tensor per hidden layer (all layers but the last).
    """
    for chain, chain_factors in zip(topology.chains, factors):
        if len(chain_factors) != len(chain.layers) - 1:
            raise ValueError(f"chain {chain.name}: need {len(chain.layers) - 1} factor tensors")
        for l, c in enumerate(chain_factors):
            layer, nxt = chain.layers[l], chain.layers[l + 1]
            c = c.to(layer.weight)
            if bool((c <= 0).any()):
                raise ValueError("rescale_hidden_units_: factors must be positive")
            layer.weight3d().mul_(c.view(-1, 1, 1))
            if layer.bias is not None:
                layer.bias.mul_(c)
            nxt.weight3d().div_(c.view(1, -1, 1))


def random_unit_factors(
    topology: Topology, spread: float, generator: torch.Generator | None = None
) -> list[list[Tensor]]:
    """Random per-node factors ``exp(U(-spread, spread))`` for :func:`rescale_hidden_units_`."""
    out: list[list[Tensor]] = []
    for chain in topology.chains:
        per = []
        for layer in chain.layers[:-1]:
            u = torch.rand(layer.n_out, generator=generator, dtype=torch.float64)
            per.append(torch.exp((2 * u - 1) * spread))
        out.append(per)
    return out
