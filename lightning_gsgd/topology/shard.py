"""Topologies of models sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``).

Detection runs on the model as built, **before** ``fully_shard``: it traces the forward and
rescales hidden units, which needs whole weights. ``fully_shard`` then replaces every parameter by
a new ``nn.Parameter`` holding a row-sharded ``DTensor``, so the topology's references go stale;
:func:`shard_topology` re-points them, by module name, at the sharded model's parameters. Detection
on a model whose parameters are already DTensors is refused (:func:`refuse_sharded`).
"""

from __future__ import annotations

from dataclasses import replace

from torch import Tensor, nn

from lightning_gsgd.topology.types import ChainLayer, Topology, TopologyError

_DETECT_FIRST = (
    "detect the topology on the model as built, before fully_shard (detect_topology traces the forward and "
    "rescales hidden units, which needs whole weights), then call "
    "lightning_gsgd.shard_topology(topology, model) after fully_shard"
)


def is_dtensor(t: Tensor | None) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (False where torch has no distributed)."""
    if t is None:
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return False
    return isinstance(t, DTensor)


def refuse_sharded(model: nn.Module) -> None:
    """Refuse detection on a model whose parameters are DTensors (sharded by ``fully_shard``).

    Raises:
        TopologyError: Names the first sharded parameter and says what to do instead.
    """
    for name, p in model.named_parameters():
        if is_dtensor(p):
            raise TopologyError(
                f"detect_topology: parameter '{name}' is a DTensor (the model is already sharded by fully_shard "
                f"or tensor parallelism); {_DETECT_FIRST}."
            )


def is_sharded(topology: Topology) -> bool:
    """Whether any chain or BN-heuristic weight of ``topology`` is a DTensor."""
    layers = [layer for chain in topology.chains for layer in chain.layers] + list(topology.bn_layers)
    return any(is_dtensor(layer.weight) or is_dtensor(layer.bias) for layer in layers)


def refuse_sharded_dags(topology: Topology, who: str) -> None:
    """Refuse a topology with DAG chains or BatchNorm segments for sharded training (the sharded steps
    handle sequence chains of Linear/Conv layers only)."""
    dags = [chain.name for chain in topology.chains if not chain.is_sequence]
    if dags:
        raise TopologyError(
            f"{who}: {len(dags)} chain(s) with fan-out or concatenation ({', '.join(dags[:3])}); sharded "
            "steps support sequence chains only for now: detect with exclude= on those layers, or do not shard"
        )
    bn = topology.bn_segment_names()
    if bn:
        raise TopologyError(
            f"{who}: {len(bn)} BatchNorm segment(s) ({', '.join(bn[:3])}); sharded steps do not support "
            "bn_mode='exact' yet: detect with bn_mode='sgd', or do not shard"
        )


def shard_topology(topology: Topology, model: nn.Module) -> Topology:
    """The same chains, each layer's weight and bias read again from ``model`` by module name.

    Call it after ``fully_shard`` (FSDP2), which replaces the parameters the topology holds. Works on
    any model with the same module names and shapes (a no-op on the model the topology was built on).

    Args:
        topology: From :func:`lightning_gsgd.detect_topology` on the unsharded model.
        model: The same model after ``fully_shard`` (or any model with the same module names).

    Returns:
        A new :class:`Topology` whose layers hold ``model``'s parameters.

    Raises:
        TopologyError: A layer is missing from ``model`` or its weight or bias has another shape.
    """

    def again(layer: ChainLayer) -> ChainLayer:
        try:
            module = model.get_submodule(layer.name)
        except AttributeError as err:
            raise TopologyError(f"shard_topology: the model has no module '{layer.name}'") from err
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        for kind, old, new in (("weight", layer.weight, weight), ("bias", layer.bias, bias)):
            if (old is None) != (new is None) or (old is not None and tuple(old.shape) != tuple(new.shape)):
                raise TopologyError(
                    f"shard_topology: the {kind} of layer '{layer.name}' does not match the topology "
                    f"({None if old is None else tuple(old.shape)} vs {None if new is None else tuple(new.shape)})"
                )
        return replace(layer, weight=weight, bias=bias)

    refuse_sharded_dags(topology, "shard_topology")
    chains = tuple(replace(chain, layers=tuple(again(layer) for layer in chain.layers)) for chain in topology.chains)
    bn_layers = tuple(again(layer) for layer in topology.bn_layers)
    return replace(topology, chains=chains, bn_layers=bn_layers)
