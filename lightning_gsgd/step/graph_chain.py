"""What the compiled step (:mod:`lightning_gsgd.step.graph`) needs of one chain, built once from its plan.

A chain's shapes and offsets become constants of the graph; its index tensors travel as one int64
and one float32 tensor (each input costs wrapper and guard time on every call). The sigma and free
tau entries are described by row and column numbers that the graph compares against (float32, so
exact up to 2**24 rows or entries per row).
"""

from __future__ import annotations

import logging
import time
import types
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_gsgd.step.direct_call import InductorCapture
from lightning_gsgd.step.plan import ChainPlan

# Columns of the hyper-parameter table.
LR, WD, K_BUF, K_D, A_D, A_BUF, MIN_RATIO = range(7)
N_HP = 7
# Order of the plan's index tensors in GraphChain.ints, after the L ``sel`` tensors.
INDEX_NAMES = (
    "walk_bf",
    "walk_g_rows",
    "tau_take",
    "sig_take",
    "free",
    "first_free",
    "nxt",
    "free_pos",
    "free_nodes",
    "tau_layer",
    "col_node",
    "row_end",
)


@dataclass(frozen=True)
class GraphChain:
    """What the graph needs of one chain: shapes and offsets (constants) and two index tensors.

    Attributes:
        n_layers: Number of layers L.
        hidden: Hidden nodes H.
        n_rows: Rows R (hidden nodes, then the output layers' nodes).
        is_hidden: Per layer, whether its nodes are hidden nodes.
        row_off: Per layer, the offset of its nodes in the row numbering.
        reads_hidden: Per layer, whether some input column holds a hidden node (then its entries
            have per-entry values: ``B`` of their column, and the tau values).
        shape2: ``(n_out, K)`` per layer.
        koff: Per layer, the offset of its ``K`` entries among the per-entry values of the layers
            that read hidden nodes (0 for the others, which have none).
        ispec: ``(offset, shape)`` in ``ints`` of ``sel[0 .. L-1]`` then of the ``INDEX_NAMES`` tensors.
        fspec: Per layer ``(sig_k, tau_k)`` offsets in ``floats`` (-1 where there is none): the entry
            ``k`` of row ``b``'s sigma weight (``[n_out]``, hidden layers), and the row whose free
            tau weight is entry ``k``, else -1 (``[K]``, layers that hold free tau edges).
        normalized: The chain's S2 layers (``ChainPlan.normalized``).
        tied_layer: Per tied parameter, the layer it is a hidden bias of (``ChainPlan.tied_layer``);
            the graph receives the tied tensors after the layers' biases.
        ints: The int64 index tensors, flattened and concatenated.
        floats: float32: ``0, 1, 2, ...`` (``max K, n_out`` entries), then the ``fspec`` vectors.
    """

    n_layers: int
    hidden: int
    n_rows: int
    is_hidden: tuple[bool, ...]
    row_off: tuple[int, ...]
    reads_hidden: tuple[bool, ...]
    shape2: tuple[tuple[int, int], ...]
    koff: tuple[int, ...]
    ispec: tuple[tuple[int, tuple[int, ...]], ...]
    fspec: tuple[tuple[int, int], ...]
    normalized: tuple[int, ...]
    ints: Tensor
    floats: Tensor
    tied_layer: tuple[int, ...] = ()

    def row_inputs(self, l: int) -> list[tuple[int, int]]:
        """Layer ``l``'s hidden bias and tied parameters: per one, ``(its index in the chain's bias
        lists, its row in the hyper-parameter table)``; the tied ones follow the ``L`` layers' biases
        in both (rows ``L + l``, then ``2L + i``)."""
        L = self.n_layers
        return [(l, L + l)] + [(L + i, 2 * L + i) for i, k in enumerate(self.tied_layer) if k == l]


def graph_chain(plan: ChainPlan, centre: tuple[int, ...]) -> GraphChain:
    """The :class:`GraphChain` of a chain from its plan (tensors on the plan's device).

    Args:
        plan: The chain's index plan.
        centre: Per layer, the centre tap (``ChainLayer.centre``); the plan's ``sel`` already holds
            it, kept for the callers' signature.
    """
    del centre  # the skeleton positions in plan.sel include the centre tap
    L = plan.n_layers
    col_node: list[Tensor] = []
    koff = [0] * L
    k_total = 0
    width = max(max(n_out, n_in * taps) for n_out, n_in, taps in plan.shape3)
    if width > 2**24:  # row and column numbers are compared as float32, exact up to 2**24
        raise ValueError(
            f"GSGD(compiled=True): a chain layer has {width} rows or entries per row, more than the "
            f"compiled step handles (2**24); use compiled=False"
        )
    floats: list[Tensor] = [torch.arange(width, dtype=torch.float32)]
    f_at = width
    fspec: list[tuple[int, int]] = []
    for l, (n_out, n_in, taps) in enumerate(plan.shape3):
        # plan.sel[l]: the sigma entries (b, sigma column) row by row, then the free tau entries
        K = n_in * taps
        sel = plan.sel[l].cpu()
        n_sig = plan.n_sig[l]
        sig = tau = -1
        if n_sig:
            floats.append((sel[:n_sig] % K).float())
            sig, f_at = f_at, f_at + n_out
        taus = sel[n_sig:]
        if taus.numel():
            k_row = torch.full((K,), -1.0)
            k_row[taus % K] = (taus // K).float()
            floats.append(k_row)
            tau, f_at = f_at, f_at + K
        if plan.reads_hidden[l]:
            col_node.append(plan.col_node[l].cpu().repeat_interleave(taps))
            koff[l] = k_total
            k_total += K
        fspec.append((sig, tau))
    empty = torch.zeros(0, dtype=torch.long)
    parts = [*plan.sel] + [getattr(plan, name) for name in INDEX_NAMES[:-2]]
    parts.append((torch.cat(col_node) if col_node else empty).to(plan.device))
    parts.append(plan.row_end)
    ispec = []
    i_at = 0
    for t in parts:
        ispec.append((i_at, tuple(t.shape)))
        i_at += t.numel()
    ints = torch.cat([t.reshape(-1).long() for t in parts])
    shape2 = tuple((n_out, n_in * taps) for n_out, n_in, taps in plan.shape3)
    return GraphChain(
        L,
        plan.hidden,
        plan.n_rows,
        plan.is_hidden,
        plan.row_off,
        plan.reads_hidden,
        shape2,
        tuple(koff),
        tuple(ispec),
        tuple(fspec),
        plan.normalized,
        ints,
        torch.cat(floats).to(plan.device),
        plan.tied_layer,
    )


def normalized_f(
    ch: GraphChain, w2: list[Tensor], B: Tensor, F: Tensor, one: Tensor, col_node: Tensor, row_end: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """S2 (docs/math.md, "BatchNorm segments: S1 and S2"): ``F`` of the hidden rows and of the output
    rows, each divided by ``sqrt(n)`` of the S2 row where its tau chain ends (``n_k = sum (w B)^2``
    over the row; 1 for rows that no BatchNorm normalizes); third, ``B`` per entry, which the graph
    must return: a graph output is stored once, where otherwise Inductor fused its gather into the
    row-norm loops as one scalar load per weight entry (ResNet-18's step: 2.05x torch's SGD before,
    1.08x after; ``benchmarks/README.md``)."""
    b_ent = torch.cat([B, one])[col_node]  # B of the input node of every entry of the layers reading hidden nodes
    parts = []
    for l in sorted(range(ch.n_layers), key=lambda l: ch.row_off[l]):
        n_out, K = ch.shape2[l]
        if l not in ch.normalized:
            parts.append(w2[l].new_ones(n_out))
            continue
        w = w2[l] * b_ent[ch.koff[l] : ch.koff[l] + K] if ch.reads_hidden[l] else w2[l]
        parts.append(row_sums(w.square()))
    q_end = torch.cat(parts)[row_end].sqrt()
    return F / q_end[: ch.hidden], torch.reciprocal(q_end[ch.hidden :]), b_ent


def row_sums(x: Tensor) -> Tensor:
    """``x.sum(1)`` of an ``[n, K]`` product inside the compiled graph. On the CPU, with ``K`` a multiple
    of 8, the rows are summed as ``[n, K / 8, 8]``: Inductor then keeps eight partial sums a row
    instead of one vector accumulator, whose dependency chain bounded the loop (the MLP step with
    momentum: 1.34x torch's SGD before, 1.21x after; ``benchmarks/README.md``). Same sum, other rounding."""
    n, k = x.shape
    if x.device.type != "cpu" or k % 8 or k < 64:
        return x.sum(1)
    return x.view(n, k // 8, 8).sum(1).sum(1)


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The hyper-parameters' dtype for parameters of ``dtype``: at least float32, so that an lr of
    1e-3 is not rounded to bfloat16's three digits (the O(H) part then runs in float32 too)."""
    return torch.promote_types(dtype, torch.float32)


def piece(flat: Tensor, spec: tuple[int, tuple[int, ...]]) -> Tensor:
    """The tensor at ``spec = (offset, shape)`` of a chain's flat index data (``GraphChain.ints``)."""
    at, shape = spec
    n = 1
    for s in shape:
        n *= s
    return flat[at : at + n].view(shape)


def own_copy(fn: Any) -> Any:
    """A new function object with a new code object: Dynamo keeps its compiled variants per code object,
    so each step structure compiling its own copy never meets Dynamo's per-function recompile limit."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class TimedFirstCall:
    """A compiled step that logs how long its first call took: that call compiles it (seconds on a
    CPU), once per step structure and process; later calls go straight to the compiled function.

    With Inductor, every call through ``torch.compile`` that compiled a graph binds it
    (:meth:`~lightning_gsgd.step.direct_call.InductorCapture.bind`, with ``flatten`` of the call's
    arguments), and :meth:`replay` calls the bound graph without Dynamo.

    Args:
        fn: The ``torch.compile``-d step.
        what: Who compiles, for the log line (``"GSGD"``, ``"GAdam"``).
        capture: The Inductor backend of ``fn`` (``None``: another backend, every call through ``fn``).
        flatten: The step's arguments as one flat list in a fixed order (``graph.flat_args``).
    """

    def __init__(self, fn: Any, what: str, capture: InductorCapture | None = None, flatten: Any = None) -> None:
        self.fn, self.what, self.capture, self.flatten = fn, what, capture, flatten
        self.compile_seconds: float | None = None

    def __call__(self, *args: Any) -> Any:
        """The step through ``torch.compile`` (which compiles on the first call and on a new input layout)."""
        compiles = 0 if self.capture is None else self.capture.compiles
        if self.compile_seconds is not None:
            out = self.fn(*args)
        else:
            start = time.perf_counter()
            out = self.fn(*args)
            self.compile_seconds = time.perf_counter() - start
            logging.getLogger("lightning_gsgd").info(
                "%s: the compiled step took %.1f s to compile and run its first step (once per model structure "
                "and process; compiled=False avoids it)",
                self.what,
                self.compile_seconds,
            )
        if self.capture is not None:
            self.capture.bind(self.flatten(*args), compiles)
        return out

    def replay(self, *args: Any) -> None:
        """The step again, its output unused: the bound graph without Dynamo when its inputs pass the
        guards (:mod:`lightning_gsgd.step.direct_call`), else through ``torch.compile`` without binding
        what it compiles then (a one-off layout, such as a gradient with other strides, does not take
        the binding from the usual one)."""
        capture = self.capture
        if capture is not None and capture.picks is not None:
            flat = self.flatten(*args)
            if capture.call([flat[i] for i in capture.picks]):
                return
        self.fn(*args)


def compile_step(
    fn: Any, options: dict[str, Any], what: str, cpp_wrapper: bool = False, flatten: Any = None
) -> TimedFirstCall:
    """``torch.compile`` a copy of the step function ``fn`` for one step structure.

    Dynamo keeps only its tensor guards (shape, stride, dtype, device): the callers key the structure
    themselves. ``options`` are extra ``torch.compile`` arguments (tests pass ``backend="eager"``).
    ``cpp_wrapper``: Inductor calls the kernels from C++, not Python
    (:func:`~lightning_gsgd.step.auto_compile.use_cpp_wrapper`); ``options`` may override it. With
    Inductor the graph is compiled by an :class:`~lightning_gsgd.step.direct_call.InductorCapture`
    (``TimedFirstCall.capture``), so that :meth:`TimedFirstCall.replay` can call it without Dynamo;
    ``flatten`` lays out ``fn``'s arguments for it (:func:`~lightning_gsgd.step.graph.flat_args`).
    """
    opts = {"dynamic": False, **options}
    guards = {"guard_filter_fn": torch.compiler.keep_tensor_guards_unsafe}
    capture = None
    if opts.get("backend", "inductor") == "inductor":
        # size_asserts: input sizes are guarded by Dynamo already. With the C++ wrapper, one planned pool
        # instead of a malloc per intermediate buffer is faster too (with the Python wrapper it was slower:
        # benchmarks/README.md).
        config = {"size_asserts": False, "cpp_wrapper": cpp_wrapper, "memory_planning": cpp_wrapper}
        config.update(opts.pop("options", {}))
        capture = InductorCapture(config)
        opts["backend"] = capture
        opts["options"] = guards
        wrapper = " (Inductor's C++ wrapper)" if config["cpp_wrapper"] else ""
    else:
        opts["options"] = {**guards, **opts.get("options", {})}
        wrapper = ""
    return TimedFirstCall(torch.compile(own_copy(fn), **opts), what + wrapper, capture, flatten)
