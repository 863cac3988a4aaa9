"""Which ops keep a layer's hidden units apart and commute with positive per-unit scaling.

Between two weight layers of a chain, every op must map "unit ``j`` scaled by ``c > 0``" to "the
entries of unit ``j`` scaled by ``c``", and must not mix units. A :class:`Layout` says where the
units of a tensor live; :func:`transition` gives the layout after an op, or the reason the chain
must end there; :func:`accepts` says how a Linear or Conv layer reads the units of its input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from lightning_gsgd.topology.graph import Op
from lightning_gsgd.topology.reasons import Why, known_stop, op_stops

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

# Element-wise maps f with f(c x) = c f(x) for every c > 0 (piecewise linear through 0, or a
# value-independent random mask), by canonical op name (module class names and call names).
ELEMENTWISE = frozenset(
    {
        "ReLU",
        "LeakyReLU",
        "PReLU",
        "RReLU",
        "Dropout",
        "Dropout1d",
        "Dropout2d",
        "Dropout3d",
        "Identity",
        "relu",
        "leaky_relu",
        "prelu",
        "rrelu",
        "dropout",
        "dropout1d",
        "dropout2d",
        "dropout3d",
        "feature_dropout",
        "contiguous",
        "clone",
        "detach",
    }
)
# Per-channel maps over the spatial dims of an ``[N, C, *spatial]`` tensor, homogeneous per channel.
SPATIAL = frozenset(
    {
        "MaxPool1d",
        "MaxPool2d",
        "MaxPool3d",
        "AvgPool1d",
        "AvgPool2d",
        "AvgPool3d",
        "AdaptiveAvgPool1d",
        "AdaptiveAvgPool2d",
        "AdaptiveAvgPool3d",
        "AdaptiveMaxPool1d",
        "AdaptiveMaxPool2d",
        "AdaptiveMaxPool3d",
        "max_pool1d",
        "max_pool2d",
        "max_pool3d",
        "avg_pool1d",
        "avg_pool2d",
        "avg_pool3d",
        "adaptive_avg_pool1d",
        "adaptive_avg_pool2d",
        "adaptive_avg_pool3d",
        "adaptive_max_pool1d",
        "adaptive_max_pool2d",
        "adaptive_max_pool3d",
    }
)
# Reshapes: valid when the shapes show that each unit's entries stay together (row-major order).
RESHAPE = frozenset({"Flatten", "Unflatten", "flatten", "view", "reshape", "squeeze", "unsqueeze", "unflatten"})
# Reductions (amax: max) over dims given by a ``dim`` argument: fine unless they include the units' dim.
REDUCE = frozenset({"mean", "sum", "amax"})
BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@dataclass(frozen=True)
class Layout:
    """Where the units of a tensor live: along ``dim``, ``inner`` consecutive entries per unit.

    A Linear output ``[..., F]`` has ``dim = ndim - 1, inner = 1``; a Conv output ``[N, C, *S]``
    has ``dim = 1, inner = 1``; after flattening it to ``[N, C * prod(S)]``, ``dim = 1`` and
    ``inner = prod(S)`` (entry ``f`` belongs to unit ``f // inner``).
    """

    dim: int
    units: int
    inner: int = 1


def is_batchnorm(op: Op) -> bool:
    """Whether the op is a BatchNorm module or ``F.batch_norm`` call (normalizes dim 1)."""
    return (op.kind == "module" and isinstance(op.module, BATCHNORM)) or (op.kind == "call" and op.name == "batch_norm")


# Methods through which a Linear/Conv subclass can change what the layer computes.
_COMPUTE_METHODS = ("forward", "_conv_forward", "__call__")
# Names of the weight re-parametrizations and hook objects of torch.nn.utils, for messages.
_KNOWN_NAMES = {
    "_WeightNorm": "weight_norm",
    "_SpectralNorm": "spectral_norm",
    "WeightNorm": "torch.nn.utils.weight_norm",
    "SpectralNorm": "torch.nn.utils.spectral_norm",
}


def _plain_base(module: nn.Module) -> type[nn.Module] | None:
    """The ``nn.Linear`` / ``nn.ConvNd`` class the module's class derives from (``None``: neither)."""
    for base in (nn.Linear, *CONVS):
        if isinstance(module, base):
            return base
    return None


def _hook_name(hook: object) -> str:
    name = getattr(hook, "__qualname__", None) or type(hook).__name__
    return _KNOWN_NAMES.get(type(hook).__name__, name)


def computation_problem(module: nn.Module) -> Why | None:
    """Why ``module`` may not compute the plain ``nn.Linear`` / ``nn.ConvNd`` map of its own Parameters.

    A layer is plain when its class is ``nn.Linear`` / ``nn.ConvNd``, or a subclass that overrides
    none of ``forward``, ``_conv_forward``, ``__call__``; it has no parametrization
    (``torch.nn.utils.parametrize``: weight_norm, spectral_norm, ...); no forward hook or forward
    pre-hook is registered on it or globally (``register_module_forward_hook``); and its weight is
    an ``nn.Parameter``. Only the structure is read: no forward pass, so a zero gain or a dead
    branch cannot hide anything from it.

    Returns:
        ``None`` for a plain layer, else a short reason naming the class and the cause.
    """
    from torch.nn.utils import parametrize

    cls = type(module)
    base = _plain_base(module)
    if base is None:
        return Why(f"{cls.__name__} is not a Linear or Conv layer")
    if parametrize.is_parametrized(module):
        kinds = []
        for tensor_name, plist in module.parametrizations.items():  # type: ignore[union-attr]
            for p in plist:
                kinds.append(f"{_KNOWN_NAMES.get(type(p).__name__, type(p).__name__)} on '{tensor_name}'")
        base_name = cls.__mro__[1].__name__ if cls.__name__.startswith("Parametrized") else cls.__name__
        return Why(
            f"{base_name} has a parametrization ({', '.join(kinds)}): its weight is computed, not the Parameter",
            f"{base_name} has a parametrization: its weight is computed, not the Parameter",
        )
    over = [m for m in _COMPUTE_METHODS if getattr(cls, m, None) is not getattr(base, m, None)]
    if over:
        name = cls.__name__ if cls.__name__ != base.__name__ else f"{cls.__module__}.{cls.__qualname__}"
        return Why(f"{name} overrides {'/'.join(over)} (a subclass of nn.{base.__name__} whose computation may differ)")
    problem = hook_problem(module)
    if problem is not None:
        return problem
    if not isinstance(module.weight, nn.Parameter):
        return Why(f"{cls.__name__}'s weight is a {type(module.weight).__name__}, not an nn.Parameter")
    return None


def hook_problem(module: nn.Module) -> Why | None:
    """Why a forward hook or pre-hook on ``module``, or a global one, may change its computation (``None``: none)."""
    from torch.nn.modules import module as module_mod

    cls = type(module)
    for what, own, glob in (
        ("forward pre-hook", module._forward_pre_hooks, module_mod._global_forward_pre_hooks),
        ("forward hook", module._forward_hooks, module_mod._global_forward_hooks),
    ):
        if own:
            names = ", ".join(_hook_name(h) for h in own.values())
            return Why(
                f"{cls.__name__} has a {what} ({names}) that may change its computation",
                f"{cls.__name__} has a {what} that may change its computation",
            )
        if glob:
            names = ", ".join(_hook_name(h) for h in glob.values())
            return Why(f"a global module {what} is registered ({names}) that may change every layer's computation")
    return None


def weight_layer_problem(module: nn.Module) -> Why | None:
    """Why a module cannot be a chain layer, or ``None`` if it can.

    It can when :func:`computation_problem` finds it plain and, for a convolution, ``groups == 1``.
    """
    problem = computation_problem(module)
    if problem is not None:
        return problem
    if isinstance(module, CONVS) and module.groups != 1:
        kind = "depthwise" if module.groups == module.in_channels else "grouped"
        return Why(
            f"{kind} convolution (groups={module.groups}): not supported yet, a chain layer needs groups=1",
            f"{kind} convolution (groups > 1): not supported yet",
        )
    return None


def is_weight_layer(op: Op) -> bool:
    """Whether the op is a call of an ``nn.Linear`` or ``nn.ConvNd`` module."""
    return op.kind == "module" and isinstance(op.module, (nn.Linear, *CONVS))


def conv_centre(kernel_size: tuple[int, ...]) -> int:
    """Flat index of the kernel's centre tap (``k // 2`` in every dimension)."""
    idx = 0
    for k in kernel_size:
        idx = idx * k + k // 2
    return idx


def output_layout(op: Op, in_shape: tuple[int, ...] | None) -> Layout | None:
    """Layout of a weight layer's output, or ``None`` when its units cannot be located."""
    mod = op.module
    if op.shape is None or in_shape is None:
        return None
    if isinstance(mod, CONVS):
        nd = len(mod.kernel_size)
        if len(in_shape) != nd + 2:  # unbatched input: dim 0 would be the channels
            return None
        return Layout(1, mod.out_channels)
    assert isinstance(mod, nn.Linear)
    return Layout(len(op.shape) - 1, mod.out_features)


def accepts(op: Op, layout: Layout, in_shape: tuple[int, ...]) -> tuple[int, int] | Why:
    """How weight layer ``op`` reads units in ``layout``: ``(n_in, taps)``, or why it cannot."""
    mod = op.module
    if isinstance(mod, CONVS):
        nd = len(mod.kernel_size)
        if layout.dim != 1 or layout.inner != 1 or len(in_shape) != nd + 2:
            return Why(f"'{op.qualname}' does not read the units as channels", "the next layer does not read its units")
        if mod.in_channels != layout.units:
            return Why(
                f"'{op.qualname}' reads {mod.in_channels} channels, not the {layout.units} units",
                "the next layer reads another number of channels",
            )
        return layout.units, math.prod(mod.kernel_size)
    assert isinstance(mod, nn.Linear)
    if layout.dim != len(in_shape) - 1:
        return Why(
            f"'{op.qualname}' reads the last dim, but the units are on dim {layout.dim}",
            "the next Linear does not read the units' dim",
        )
    if mod.in_features != layout.units * layout.inner:
        return Why(
            f"'{op.qualname}' reads {mod.in_features} features, not {layout.units} x {layout.inner}",
            "the next Linear reads another number of features",
        )
    return layout.units, layout.inner


def _dims(op: Op) -> tuple[int, ...] | None:
    dim = op.kwargs.get("dim", op.args[1] if len(op.args) > 1 else None)
    if isinstance(dim, int):
        return (dim,)
    if isinstance(dim, (tuple, list)) and all(isinstance(d, int) for d in dim):
        return tuple(dim)
    return None


def _reshape(layout: Layout, src: tuple[int, ...], dst: tuple[int, ...]) -> Layout | None:
    if layout.inner == 1 and layout.dim == len(src) - 1 and dst and dst[-1] == src[-1]:
        return Layout(len(dst) - 1, layout.units)  # units stay on the last dim
    if layout.dim != 1 or len(dst) < 2 or src[0] != dst[0]:
        return None
    block = layout.inner * math.prod(src[2:])  # consecutive entries of one unit, per sample
    rest = math.prod(dst[2:])
    if block % rest != 0 or dst[1] * rest != layout.units * block:
        return None
    return Layout(1, layout.units, block // rest)


def transition(op: Op, layout: Layout, in_shape: tuple[int, ...]) -> Layout | Why:
    """The layout after ``op`` (which reads the units' tensor as its only data input), or why not.

    Returns:
        The new :class:`Layout`, or the reason (:class:`~lightning_gsgd.topology.reasons.Why`) naming the op.
    """
    out = op.shape
    name, desc = op.name, op.describe()
    if op.kind == "output":
        return Why("model output", "the model's output layer")
    if out is None:  # e.g. a tuple; attention modules return one too
        known = known_stop(op)
        return known or Why(f"{desc} (output is not a single tensor)", f"{name} does not return a single tensor")
    if is_batchnorm(op):
        return Why(f"{desc} normalizes its outputs (see bn_mode)", f"{name} normalizes its outputs (see bn_mode)")
    if name in ELEMENTWISE:
        if out != in_shape:
            return Why(f"{desc} changes the shape", f"{name} changes the shape")
        return layout
    if name in SPATIAL:
        if layout.dim == 1 and layout.inner == 1 and len(in_shape) == len(out) >= 3 and in_shape[:2] == out[:2]:
            return layout
        return Why(f"{desc} does not act per channel here", f"{name} does not act per channel here")
    if name in RESHAPE:
        new = _reshape(layout, in_shape, out)
        if new is not None:
            return new
        return Why(
            f"{desc} {in_shape} -> {out} does not keep the units on one dim with each unit's entries consecutive",
            f"{name} does not keep the units on one dim",
        )
    if name in REDUCE:
        dims = _dims(op)
        if dims is not None and layout.inner == 1:
            norm = {d % len(in_shape) for d in dims}
            keepdim = op.kwargs.get("keepdim", op.args[2] if len(op.args) > 2 else False)
            dim = layout.dim if keepdim else layout.dim - sum(d < layout.dim for d in norm)
            if norm and layout.dim not in norm and 0 <= dim < len(out) and out[dim] == layout.units:
                return Layout(dim, layout.units)  # a sum/mean/max over other dims, unit by unit
        over = "all dims" if dims is None else f"dims {dims}"
        if dims is None or layout.dim in {d % len(in_shape) for d in dims}:
            return Why(f"{desc} over {over} reduces across the units, mixing them", f"{name} mixes units")
        return Why(
            f"{desc} over {over} is not supported here (the units cannot be followed through it)",
            f"{name} is not supported here",
        )
    if name == "clamp" or name == "clamp_min":
        lo = op.kwargs.get("min", op.args[1] if len(op.args) > 1 else None)
        hi = op.kwargs.get("max", op.args[2] if len(op.args) > 2 else None)
        if name == "clamp_min":
            hi = None
        if lo == 0 and hi is None and out == in_shape:
            return layout  # clamp(x, min=0) is ReLU
    return op_stops(op)
