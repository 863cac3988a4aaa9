"""Find the ReLU chains of a model: ``detect_topology``.

This version walks ``nn.Sequential`` models (nested ones too), running ``example_input`` through
them to learn every layer's input layout (channels and spatial size, needed for Flatten -> Linear).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_gsgd.topology import Chain, ChainLayer, Excluded, Topology, TopologyError

# Maps that commute with positive per-unit scaling and keep each unit in its own channel/feature.
HOMOGENEOUS = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Identity,
)
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def weight_layer_problem(module: nn.Module) -> str | None:
    """Why a Linear/Conv module cannot be a chain layer, or ``None`` if it can."""
    if isinstance(module, CONVS):
        if module.groups != 1:
            return f"grouped/depthwise convolution (groups={module.groups})"
        return None
    if isinstance(module, nn.Linear):
        return None
    return f"{type(module).__name__} is not a Linear or Conv layer"


def conv_centre(kernel_size: tuple[int, ...]) -> int:
    """Flat index of the kernel's centre tap (``k // 2`` in every dimension)."""
    idx = 0
    for k in kernel_size:
        idx = idx * k + k // 2
    return idx


@dataclass
class _Builder:
    """Accumulates the layers of the chain being built and the layout of its current activation."""

    layers: list[ChainLayer] = field(default_factory=list)
    pending: ChainLayer | None = None  # last weight layer, not yet known to have a successor
    channels: int = 0  # nodes of the current activation
    spatial: int = 1  # entries per node after a flatten (product of spatial dims)
    flat: bool = False  # whether the activation is [N, channels * spatial] (after Flatten)
    feature_last: bool = True  # nodes live on the last dim (Linear output) or dim 1 (conv output)


def _make_layer(name: str, module: nn.Module, n_in: int, taps: int) -> ChainLayer:
    if isinstance(module, CONVS):
        k = tuple(module.kernel_size)
        return ChainLayer(name, module.weight, module.bias, module.out_channels, n_in, taps, conv_centre(k))
    assert isinstance(module, nn.Linear)
    return ChainLayer(name, module.weight, module.bias, module.out_features, n_in, taps, taps // 2)


def _flatten_sequential(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    out: list[tuple[str, nn.Module]] = []
    for name, child in module.named_children():
        full = f"{prefix}.{name}" if prefix else name
        if isinstance(child, nn.Sequential):
            out.extend(_flatten_sequential(child, full))
        else:
            out.append((full, child))
    return out


def detect_topology(model: nn.Module, example_input: Any, *, allow_empty: bool = False) -> Topology:
    """Find the ReLU chains of ``model`` that G-SGD treats exactly.

    Args:
        model: An ``nn.Sequential`` (nested Sequentials allowed) of Linear, ConvNd (groups=1),
            ReLU/LeakyReLU/PReLU, pooling, dropout, Flatten and Identity layers; other modules end
            the current chain and their parameters are left to plain SGD.
        example_input: A batch the model accepts; it is run once in eval mode without gradients
            to learn the activation shapes.
        allow_empty: Return a topology without chains instead of raising.

    Returns:
        The :class:`Topology`.

    Raises:
        TopologyError: No chain was found (and ``allow_empty`` is false), or the model is not a
            Sequential.
    """
    if not isinstance(model, nn.Sequential):
        raise TopologyError(
            f"detect_topology: {type(model).__name__} is not an nn.Sequential; this version only walks "
            "Sequential models"
        )
    steps = _flatten_sequential(model, "")
    chains: list[Chain] = []
    reasons: dict[int, str] = {}
    b = _Builder()

    def close(reason: str) -> None:
        nonlocal b
        layers = b.layers + ([b.pending] if b.pending is not None else [])
        if len(layers) >= 2:
            chains.append(Chain(tuple(layers)))
        elif layers:
            reasons[id(layers[0].weight)] = f"no ReLU chain through '{layers[0].name}' ({reason})"
        b = _Builder()

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = example_input
            for name, module in steps:
                y = module(x)
                if isinstance(module, (nn.Linear, *CONVS)):
                    problem = weight_layer_problem(module)
                    if problem is not None:
                        close(f"'{name}' is a {problem}")
                        reasons[id(module.weight)] = f"'{name}': {problem}"
                        x = y
                        continue
                    if b.pending is not None and _fits(b, module, x):
                        taps = _taps(b, module)
                        b.layers.append(b.pending)
                        b.pending = _make_layer(name, module, b.channels, taps)
                    else:
                        close(f"'{name}' does not read the previous layer's units directly")
                        n_in = module.in_channels if isinstance(module, CONVS) else module.in_features
                        k = math.prod(module.kernel_size) if isinstance(module, CONVS) else 1
                        b.pending = _make_layer(name, module, n_in, k)
                    b.channels = b.pending.n_out
                    b.spatial, b.flat = 1, False
                    b.feature_last = isinstance(module, nn.Linear)
                elif isinstance(module, HOMOGENEOUS):
                    pass
                elif isinstance(module, nn.Flatten) and b.pending is not None and _flatten_ok(b, module, x):
                    b.spatial = math.prod(x.shape[2:])
                    b.flat = True
                else:
                    close(f"{type(module).__name__} at '{name}' is not positively homogeneous per unit")
                x = y
            close("end of the model")
    finally:
        model.train(was_training)

    covered = {id(p) for c in chains for layer in c.layers for p in (layer.weight, layer.bias) if p is not None}
    excluded = []
    for pname, p in model.named_parameters():
        if id(p) in covered:
            continue
        owner = pname.rsplit(".", 1)[0]
        reason = reasons.get(id(p)) or reasons.get(id(_weight_of(model, owner))) or "not in a ReLU chain"
        excluded.append(Excluded(pname, p.numel(), reason))
    topo = Topology(tuple(chains), tuple(excluded))
    if not chains and not allow_empty:
        detail = "; ".join(f"{e.name}: {e.reason}" for e in excluded) or "the model has no parameters"
        raise TopologyError(f"detect_topology: no ReLU chain found ({detail})")
    return topo


def _weight_of(model: nn.Module, owner: str) -> Any:
    try:
        return model.get_submodule(owner).get_parameter("weight")
    except AttributeError:
        return None


def _fits(b: _Builder, module: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``module`` reads the pending layer's units in a layout the chain understands."""
    if isinstance(module, CONVS):
        return (not b.flat) and (not b.feature_last) and module.in_channels == b.channels and x.dim() >= 3
    assert isinstance(module, nn.Linear)
    if b.flat:
        return x.dim() == 2 and module.in_features == b.channels * b.spatial
    return b.feature_last and module.in_features == b.channels


def _taps(b: _Builder, module: nn.Module) -> int:
    if isinstance(module, CONVS):
        return math.prod(module.kernel_size)
    return b.spatial if b.flat else 1


def _flatten_ok(b: _Builder, module: nn.Flatten, x: torch.Tensor) -> bool:
    """Flatten keeps units separable only from the channel dim to the end, channel-major."""
    if b.flat:
        return False
    if b.feature_last:
        return x.dim() == 2 and module.start_dim in (1, -1)
    end = module.end_dim if module.end_dim >= 0 else x.dim() + module.end_dim
    return module.start_dim == 1 and end == x.dim() - 1 and x.shape[1] == b.channels
