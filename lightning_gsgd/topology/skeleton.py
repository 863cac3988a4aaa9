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

    Hidden node ``j`` of hidden layer ``l`` gets its incoming weights, bias and tied parameters multiplied by its
    factor, and every input column that reads it, in every layer of the chain that reads it (a DAG
    chain: fan-out to several layers, or several columns of one), divided by it.

    Args:
        topology: Chains of the model.
        factors: Per chain, one positive ``[n_out]`` tensor per hidden layer, in layer order
            (``Chain.hidden_layers``; for a sequence chain: every layer but the last).
    """
    for chain, chain_factors in zip(topology.chains, factors):
        hidden = chain.hidden_layers
        if len(chain_factors) != len(hidden):
            raise ValueError(f"chain {chain.name}: need {len(hidden)} factor tensors (one per hidden layer)")
        for l, c in zip(hidden, chain_factors):
            layer = chain.layers[l]
            c = c.to(layer.weight)
            if bool((c <= 0).any()):
                raise ValueError("rescale_hidden_units_: factors must be positive")
            layer.weight3d().mul_(c.view(-1, 1, 1))
            if layer.bias is not None:
                layer.bias.mul_(c)
            for t in layer.tied:  # the BatchNorms that add into the same channels scale with them
                t.mul_(c)
            for m, col, nodes in chain.readers(l):
                if nodes.step == 1:
                    cols = c[nodes.start : nodes.stop]
                else:
                    cols = c[torch.tensor(nodes, dtype=torch.long, device=c.device)]
                chain.layers[m].weight3d()[:, col : col + len(nodes)].div_(cols.view(1, -1, 1))


def random_unit_factors(
    topology: Topology, spread: float, generator: torch.Generator | None = None
) -> list[list[Tensor]]:
    """Random per-node factors ``exp(U(-spread, spread))`` for :func:`rescale_hidden_units_`, one
    ``float64`` tensor per hidden layer of every chain, drawn in chain and layer order."""
    out: list[list[Tensor]] = []
    for chain in topology.chains:
        per = []
        for l in chain.hidden_layers:
            u = torch.rand(chain.layers[l].n_out, generator=generator, dtype=torch.float64)
            per.append(torch.exp((2 * u - 1) * spread))
        out.append(per)
    return out


@torch.no_grad()
def rescale_normalized_rows_(topology: Topology, spread: float, generator: torch.Generator) -> None:
    """S2 rescaling (docs/math.md, "BatchNorm segments: S1 and S2"): every row (and its bias) of every
    layer whose rows go only into a training-mode BatchNorm (``Topology.s2_layers``) times
    ``exp(U(-spread, spread))``, drawn from ``generator`` layer by layer. In training mode the function
    does not change (up to BatchNorm's ``eps``). No draws for a topology without such layers.

    Args:
        topology: The model's topology.
        spread: Half-width of the log-uniform factors.
        generator: Where the factors are drawn (continue one that drew S1 factors, or a fresh one).
    """
    for layer in topology.s2_layers():
        u = torch.rand(layer.n_out, generator=generator, dtype=torch.float64)
        c = torch.exp((2 * u - 1) * spread).to(layer.weight)
        layer.weight3d().mul_(c.view(-1, 1, 1))
        if layer.bias is not None:
            layer.bias.mul_(c)
