"""BatchNorm segments for ``bn_mode="exact"``: which BatchNorms make units (S1) and normalized rows (S2).

docs/math.md, "BatchNorm segments: S1 and S2", and docs/detection.md, "BatchNorm segments":

* a BatchNorm affine (``affine=True``, a plain ``nn.BatchNorm1d/2d/3d`` or ``nn.SyncBatchNorm``, its
  parameters used nowhere else, trainable, not left out by ``include=``/``exclude=``) is labelled like
  a weight layer: its channels are hidden units when every route ends at chain layers that read
  them (:mod:`lightning_gsgd.topology.dag`), and it is then the chain layer
  ``ChainLayer(name, gamma, beta, C, 1, 1, 0)`` (:func:`bn_chain_layer`);
* a Linear/Conv (any ``groups``: :func:`alone_layer`) whose every row reaches only the input of
  training-mode BatchNorms, per channel, has S2 rows; :func:`normalizer` says which BatchNorms
  count (plain ones, not frozen in eval mode inside a model that trains).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn
from torch.nn.utils import parametrize

from lightning_gsgd.topology.graph import Op, OpGraph
from lightning_gsgd.topology.reasons import Why, group_of
from lightning_gsgd.topology.rules import BATCHNORM, CONVS, computation_problem, conv_centre, hook_problem
from lightning_gsgd.topology.types import ChainLayer

BN_MODES = ("exact", "sgd", "authors_heuristic")


def _base(module: nn.Module) -> type[nn.Module]:
    return next(b for b in BATCHNORM if isinstance(module, b))


def plain_bn_problem(module: nn.Module) -> Why | None:
    """Why a BatchNorm module may not compute the plain batch normalization of its class (``None``: it does).

    Plain: its class is one of ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``, or a subclass that
    overrides neither ``forward`` nor ``__call__`` (timm's ``BatchNormAct2d``, which adds an
    activation, does); no parametrization; no forward hook or pre-hook on it or globally.
    """
    cls, base = type(module), _base(module)
    over = [m for m in ("forward", "__call__") if getattr(cls, m, None) is not getattr(base, m, None)]
    if over:
        return Why(
            f"{cls.__name__} overrides {'/'.join(over)} (a subclass of nn.{base.__name__} whose computation may "
            "differ): not a BatchNorm segment",
            f"a BatchNorm subclass overrides {'/'.join(over)}",
        )
    if parametrize.is_parametrized(module):
        return Why(f"{cls.__name__} has a parametrization", "a BatchNorm has a parametrization")
    return hook_problem(module)


def normalizer(model: nn.Module) -> Callable[[Op], Why | None]:
    """For a BatchNorm op: ``None`` when the rows that reach it per channel are S2 rows (it normalizes
    them with batch statistics in training mode), else why not.

    A BatchNorm module in eval mode inside a model in training mode (frozen statistics) normalizes
    with its running statistics, an affine map: no S2. The modes are read when detection runs; a
    model detected in eval mode is taken to train its BatchNorms.
    """
    training = model.training

    def rule(op: Op) -> Why | None:
        mod = op.module
        if op.kind != "module" or mod is None:
            return Why(
                f"a functional '{op.name}' call normalizes it (S2 rows are found before nn.BatchNorm modules only; "
                "not supported yet)",
                f"a functional '{op.name}' call (not supported yet)",
            )
        problem = plain_bn_problem(mod)
        if problem is not None:
            return Why(f"{op.describe()}: {problem}", group_of(problem))
        if training and not mod.training and mod.track_running_stats:
            return Why(
                f"{op.describe()} is in eval mode while the model trains (frozen statistics: an affine map, "
                "its input rows are no S2 rows)",
                f"{op.name} is in eval mode while the model trains (frozen)",
            )
        return None

    return rule


def bn_unit_problem(op: Op) -> Why | None:
    """Why a BatchNorm module's channels cannot be hidden units (``None``: they can, if the routes allow).

    Usage (shared, frozen) and ``include=``/``exclude=`` are checked by the caller, as for weight layers.
    """
    mod = op.module
    assert mod is not None
    if not mod.affine:
        return Why("affine=False: no gamma/beta to carry the unit's scale")
    return plain_bn_problem(mod)


def is_bn_module(op: Op) -> bool:
    """Whether ``op`` calls a BatchNorm module."""
    return op.kind == "module" and isinstance(op.module, BATCHNORM)


def bn_chain_layer(name: str, module: nn.Module) -> ChainLayer:
    """A BatchNorm affine as a chain layer: ``gamma`` as ``[C, 1, 1]`` (one column from outside the
    chain: ``gamma[j]`` is the sigma edge of unit ``j``), ``beta`` as its bias."""
    return ChainLayer(name, module.weight, module.bias, module.num_features, 1, 1, 0)


def alone_layer(name: str, module: nn.Module) -> ChainLayer:
    """An S2 layer in no chain (``B = F = 1``), any ``groups``: ``[n_out, in / groups, taps]``."""
    w = module.weight
    if isinstance(module, CONVS):
        k = tuple(module.kernel_size)
        return ChainLayer(name, w, module.bias, w.shape[0], w.shape[1], math.prod(k), conv_centre(k))
    return ChainLayer(name, w, module.bias, w.shape[0], w.shape[1], 1, 0)


def groups_only(module: nn.Module) -> bool:
    """Whether a Linear/Conv is refused as a chain layer only for its ``groups`` (it may still have S2 rows)."""
    return isinstance(module, CONVS) and module.groups != 1 and computation_problem(module) is None


def bn_param_reasons(graph: OpGraph, problems: dict[int, Why | None], ends: dict[int, Why]) -> dict[int, Why]:
    """Why the parameters of BatchNorm ops are outside every chain in exact mode, by ``id``: the
    BatchNorm's own problem, or where its channels' routes end."""
    reasons: dict[int, Why] = {}
    for op in graph:
        if op.index not in problems:
            continue
        problem = problems[op.index]
        if problem is not None:
            why = Why(f"'{op.qualname}': {problem}", f"BatchNorm: {group_of(problem)}")
        else:
            after = ends.get(op.index) or Why("-")
            why = Why(
                f"'{op.qualname}' (BatchNorm): its channels are no hidden units (after it: {after})",
                f"BatchNorm channels are no units: {group_of(after)}",
            )
        for p in op.params:
            reasons[id(p)] = why
    return reasons
