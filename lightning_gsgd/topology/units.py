"""Where each weight layer's units are in a tensor, through fan-out, concatenation, slicing and shuffles.

Detection (:mod:`lightning_gsgd.topology.dag`) labels every output node of a weight layer and
carries the labels forward through the ops a unit may pass (:mod:`lightning_gsgd.topology.rules`).
A :class:`Units` says where the labelled nodes lie in one tensor; besides the ops of
:func:`~lightning_gsgd.topology.rules.transition`, this module follows the ops that move units as a
whole without mixing them: ``torch.cat`` along the units' dim (several producers, and tensors from
outside, side by side), ``chunk``/``split`` and slicing (``getitem``) that pick runs of units, and
channel shuffles (``nn.ChannelShuffle``, ``F.channel_shuffle``, and the
``view -> transpose -> reshape`` that torchvision's ShuffleNet writes).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_gsgd.topology.graph import Op
from lightning_gsgd.topology.reasons import Why, combines, op_stops
from lightning_gsgd.topology.rules import ELEMENTWISE, RESHAPE, Layout

SHIFT = 32  # a label is (producer op index << SHIFT) | node; FOREIGN marks a node from outside
FOREIGN = -1
SPLITS = frozenset({"chunk", "split"})
SHUFFLES = frozenset({"ChannelShuffle", "channel_shuffle", "native_channel_shuffle"})
TRANSPOSES = frozenset({"transpose", "swapaxes", "swapdims", "permute"})

Transition = Callable[[Op, Layout, tuple[int, ...]], "Layout | Why"]


@dataclass(frozen=True, eq=False)
class Units:
    """The labelled units of one tensor.

    Attributes:
        dim: First dim of the tensor that the units occupy.
        ids: ``int64`` labels, one per unit, shaped like the units' dims (1-D, except between the
            two reshapes of a channel shuffle, when a view has split the units over two dims).
        inner: Consecutive entries per unit along the last of those dims (after a flatten).
    """

    dim: int
    ids: Tensor
    inner: int = 1

    @property
    def flat(self) -> bool:
        """Whether the units lie on one dim."""
        return self.ids.dim() == 1

    def layout(self) -> Layout:
        """The :class:`Layout` of flat units."""
        return Layout(self.dim, self.ids.numel(), self.inner)

    def producers(self) -> set[int]:
        """Op indices of the layers whose nodes are among the units."""
        ids = self.ids[self.ids >= 0]
        return set((ids >> SHIFT).unique().tolist())


def fresh(op_index: int, layout: Layout) -> Units:
    """The units of a weight layer's own output: its nodes ``0 .. n - 1``, in order."""
    return Units(layout.dim, (op_index << SHIFT) + torch.arange(layout.units), layout.inner)


def _dim_arg(op: Op, pos: int, default: int | None) -> object:
    return op.kwargs.get("dim", op.args[pos] if len(op.args) > pos else default)


def _norm(d: object, ndim: int) -> int | None:
    return d % ndim if isinstance(d, int) and ndim else None


def join(op: Op, pieces: list[tuple[Units | None, tuple[int, ...] | None]]) -> Units | Why:
    """The units after ``cat`` of ``pieces`` (their units, ``None`` for a tensor from outside, and shapes)."""
    desc, name = op.describe(), op.name
    shapes = [s for _, s in pieces]
    if any(s is None for s in shapes) or op.shape is None:
        return combines(op)
    ndim = len(op.shape)
    d = _norm(_dim_arg(op, 1, 0), ndim)
    labelled = [u for u, _ in pieces if u is not None]
    if d is None or any(not u.flat or u.dim != d for u in labelled):
        where = f"dim {_dim_arg(op, 1, 0)}"
        units_dim = labelled[0].dim if labelled else -1
        return Why(
            f"{desc} along {where} (the units are on dim {units_dim}) is not supported yet",
            f"{name} along another dim than the units' is not supported yet",
        )
    inners = sorted({u.inner for u in labelled})
    if len(inners) > 1:
        return Why(
            f"{desc} joins pieces with {inners[0]} and {inners[-1]} entries per unit (e.g. flattened maps of "
            "different sizes): the next layer cannot read them with one number of taps",
            f"{name} joins pieces with different numbers of entries per unit",
        )
    inner = inners[0]
    parts = []
    for u, shape in pieces:
        assert shape is not None
        if u is not None:
            parts.append(u.ids)
        elif shape[d] % inner:
            return Why(
                f"{desc} joins a piece of {shape[d]} entries to units of {inner} entries each: the next layer "
                "cannot read them with one number of taps",
                f"{name} joins pieces with different numbers of entries per unit",
            )
        else:
            parts.append(torch.full((shape[d] // inner,), FOREIGN, dtype=torch.int64))
    return Units(d, torch.cat(parts), inner)


def split(op: Op, units: Units, in_shape: tuple[int, ...]) -> list[Units | None] | Why:
    """The units of each element of ``chunk``/``split`` (along any dim; along the units' dim the
    boundaries must fall between units)."""
    if op.items is None or any(s is None for s in op.items):
        return Why(
            f"{op.describe()} (output is not a tensor or tuple of tensors)", f"{op.name} does not return tensors"
        )
    if not units.flat:
        return Why(
            f"{op.describe()} of units split over several dims is not supported", f"{op.name} is not supported here"
        )
    d = _norm(_dim_arg(op, 2, 0), len(in_shape))
    if d is None:
        return Why(f"{op.describe()} along an unknown dim is not supported", f"{op.name} is not supported here")
    if d != units.dim:
        return [units for _ in op.items]
    out: list[Units | None] = []
    start = 0
    for shape in op.items:
        assert shape is not None
        size = shape[d]
        if start % units.inner or size % units.inner:
            return Why(
                f"{op.describe()} cuts through the entries of a unit ({units.inner} per unit)",
                f"{op.name} cuts through a unit's entries",
            )
        lo = start // units.inner
        out.append(Units(d, units.ids[lo : lo + size // units.inner], units.inner))
        start += size
    return out


def _index(op: Op, units: Units, in_shape: tuple[int, ...]) -> Units | Why:
    """Basic indexing ``x[...]`` (ints, slices, ``None``, ``...``)."""
    idx = op.args[1] if len(op.args) > 1 else None
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(not (isinstance(e, (int, slice)) or e is None or e is Ellipsis) for e in idx) or idx.count(Ellipsis) > 1:
        return Why(f"{op.describe()} with a tensor or list index is not supported yet", "getitem with a tensor index")
    used = sum(e is not None and e is not Ellipsis for e in idx)
    if Ellipsis in idx:
        k = idx.index(Ellipsis)
        idx = idx[:k] + (slice(None),) * (len(in_shape) - used) + idx[k + 1 :]
    dim, ids, i, out_dim = units.dim, units.ids, 0, 0
    new_dim = None
    for e in idx:
        if e is None:
            out_dim += 1
            continue
        if i >= len(in_shape):
            return Why(f"{op.describe()} indexes more dims than the tensor has", "getitem is not supported here")
        if dim <= i < dim + ids.dim():
            if not units.flat or isinstance(e, int):
                return Why(
                    f"{op.describe()} picks single entries of the units' dim (only slices of whole units are followed)",
                    "getitem picks single entries of the units' dim",
                )
            assert isinstance(e, slice)
            start, stop, step = e.indices(in_shape[i])
            if units.inner > 1 and (step != 1 or start % units.inner or stop % units.inner):
                return Why(
                    f"{op.describe()} cuts through the entries of a unit ({units.inner} per unit)",
                    "getitem cuts through a unit's entries",
                )
            if units.inner > 1:
                ids = ids[start // units.inner : max(start, stop) // units.inner]
            else:
                ids = ids[torch.arange(start, stop, step, dtype=torch.int64)]
            new_dim = out_dim
        if not isinstance(e, int):
            out_dim += 1
        i += 1
    if new_dim is None:
        new_dim = out_dim + (dim - i)  # the units' dim comes after the indexed ones
    out = Units(new_dim, ids, units.inner)
    shape = op.shape
    if shape is None or new_dim >= len(shape) or shape[new_dim] != ids.numel() * units.inner:
        return Why(f"{op.describe()} is not supported here (the units cannot be followed through it)", "getitem")
    return out


def _shuffle(op: Op, units: Units, in_shape: tuple[int, ...]) -> Units | Why:
    groups = getattr(op.module, "groups", None) if op.module is not None else None
    if groups is None:
        groups = op.kwargs.get("groups", op.args[1] if len(op.args) > 1 else None)
    n = units.ids.numel()
    if not (units.flat and units.dim == 1 and units.inner == 1 and isinstance(groups, int) and groups > 0):
        return op_stops(op)
    if n % groups or op.shape != in_shape:
        return op_stops(op)
    return Units(1, units.ids.view(groups, n // groups).t().reshape(-1))


def _reshape(op: Op, units: Units, in_shape: tuple[int, ...]) -> Units | None:
    """A view that splits the units' dim into several (a shuffle's first step) or joins them back."""
    out, d, k = op.shape, units.dim, units.ids.dim()
    if out is None or units.inner != 1:
        return None
    if k == 1:
        for m in range(2, len(out) - len(in_shape) + 2):
            if (
                out[:d] == in_shape[:d]
                and out[d + m :] == in_shape[d + 1 :]
                and math.prod(out[d : d + m]) == in_shape[d]
            ):
                return Units(d, units.ids.reshape(out[d : d + m]))
        return None
    if out[:d] == in_shape[:d] and out[d + 1 :] == in_shape[d + k :] and out[d] == units.ids.numel():
        return Units(d, units.ids.reshape(-1))
    return None


def _transpose(op: Op, units: Units, in_shape: tuple[int, ...]) -> Units | None:
    """A transpose/permute that only reorders the dims the units were split over."""
    ndim, d, k = len(in_shape), units.dim, units.ids.dim()
    if op.name == "permute":
        perm = op.args[1] if len(op.args) == 2 and isinstance(op.args[1], (tuple, list)) else op.args[1:]
        perm = op.kwargs.get("dims", perm)
    else:
        a, b = op.args[1:3] if len(op.args) >= 3 else (op.kwargs.get("dim0"), op.kwargs.get("dim1"))
        if not (isinstance(a, int) and isinstance(b, int)):
            return None
        perm = list(range(ndim))
        perm[a % ndim], perm[b % ndim] = perm[b % ndim], perm[a % ndim]
    if len(perm) != ndim or not all(isinstance(p, int) for p in perm):
        return None
    perm = [p % ndim for p in perm]
    if any(perm[i] != i for i in range(ndim) if not d <= i < d + k):
        return None
    return Units(d, units.ids.permute([p - d for p in perm[d : d + k]]))


def step(op: Op, units: Units, in_shape: tuple[int, ...], transition: Transition) -> Units | Why:
    """The units after the single-tensor op ``op`` (``transition`` for the ops it knows), or why not."""
    name = op.name
    if name == "getitem":
        return _index(op, units, in_shape)
    if name in SHUFFLES:
        return _shuffle(op, units, in_shape)
    if not units.flat:
        if name in ELEMENTWISE and op.shape == in_shape:
            return units
        moved = _reshape(op, units, in_shape) if name in RESHAPE else None
        moved = _transpose(op, units, in_shape) if name in TRANSPOSES else moved
        if moved is not None:
            return moved
        return Why(
            f"{op.describe()} acts on units that a reshape split over several dims (only a channel shuffle's "
            "transpose and the reshape back are followed)",
            f"{name} on units split over several dims is not supported",
        )
    res = transition(op, units.layout(), in_shape)
    if isinstance(res, Layout):
        return Units(res.dim, units.ids, res.inner)
    if name in RESHAPE:
        moved = _reshape(op, units, in_shape)
        if moved is not None:
            return moved
    return res
