"""Invariant-space diagnostics of a ReLU network: pure tensor code, no Lightning.

Everything here is measured in the coordinates G-SGD works in (gsgd-math.md sections 2-3): the
basis-path values ``v`` of every chain of a :class:`~lightning_gsgd.topology.Topology`, and the
gradient ``dL/dv`` obtained from ordinary weight gradients by the inverse chain rule. Path-space
quantities do not change when hidden units are positively rescaled; ``imbalance`` is the
weight-space quantity that does.

Definitions (per chain, then pooled over all chains):

* **basis paths**: one per weight entry that is not a sigma edge, plus one per hidden bias
  (``Topology.basis_paths`` of them). The output layer's bias is not a path value and is left out.
* **path_grad_norm**: ``||dL/dv||_2`` over the basis paths, at the weights the gradients belong to.
* **basis_path_norm**: ``||v||_2`` over the basis paths.
* **skeleton paths**: the basis paths made only of sigma and tau edges, i.e. the paths ``P(e)`` of
  the tau edges ``e`` that are not also sigma edges (the *free* tau edges). Every last-layer tau
  edge is one; in a chain of equal widths they are exactly the paper's skeleton paths (the paths
  through the last layer's skeleton weights), and with unequal widths free tau edges of inner
  layers join them. These are the path values the optimizer's ``R <= 0`` guard protects, so their
  smallest ``|v|`` says how close training runs to the guard. ``skeleton_abs_min``,
  ``skeleton_abs_median`` (the lower median for an even count) and ``skeleton_abs_max`` are
  statistics of ``|v|`` over them.
* **imbalance**: the population standard deviation (``correction=0``) over hidden units of
  ``log(||incoming|| / ||outgoing||)``, where *incoming* is the unit's row of its layer's weight
  (all input nodes and taps) plus its bias, and *outgoing* is its column of the next layer's weight
  (all output nodes and taps, via :meth:`ChainLayer.weight3d`, so conv channels and
  Flatten -> Linear blocks count whole). Rescaling unit ``j`` by ``c`` adds ``2 log c`` to its term;
  the function does not change. A unit with all-zero incoming or outgoing weights makes it infinite.
* **relative_update**: ``||v_after - v_before|| / ||v_before||`` over the basis paths across one
  optimizer step.
* **guard_hits** / **skipped_steps**: the optimizer's cumulative counters (tau path values the
  guard clamped; steps skipped for non-finite gradients), as floats.

Use :class:`PathDiagnostics` from a training loop or callback; the module-level functions are its
pure building blocks. Every value is a 0-d floating tensor on the parameters' device; nothing calls
``.item()`` or synchronizes with the host, so a caller decides when (and whether) to pay for it.
The optional output-invariance check lives in :mod:`lightning_gsgd.invariance`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_gsgd.functional import (
    LayerIndex,
    build_layer_index,
    chain_backbone,
    chain_gamma,
    chain_path_values,
)
from lightning_gsgd.topology import Chain, Topology

#: Keys of :func:`topology_summary`.
SUMMARY_KEYS = ("chains", "hidden_units", "basis_paths", "coverage", "covered_params", "plain_params")
#: Keys that :meth:`PathDiagnostics.before_step` returns (without per-chain keys).
BEFORE_KEYS = (
    "path_grad_norm",
    "basis_path_norm",
    "skeleton_abs_min",
    "skeleton_abs_median",
    "skeleton_abs_max",
    "imbalance",
)
#: Keys that :meth:`PathDiagnostics.after_step` returns (the counters only with a G-SGD optimizer).
AFTER_KEYS = ("relative_update", "guard_hits", "skipped_steps")
#: Per-chain keys are ``f"chain{i}/{name}"`` for these names.
PER_CHAIN_KEYS = BEFORE_KEYS + ("relative_update",)


def topology_summary(topology: Topology) -> dict[str, float]:
    """The fit-start numbers, exactly as the topology reports them.

    Returns:
        ``chains`` (number of chains), ``hidden_units`` (H), ``basis_paths`` (m - H), ``coverage``
        (share of parameters in chains, in [0, 1]), ``covered_params`` and ``plain_params`` (the
        parameters outside every chain, i.e. the ones the topology lists as excluded). Note that
        the optimizer also gives each chain's *output bias* plain SGD; it is counted as covered,
        as :attr:`Topology.coverage` does.
    """
    return {
        "chains": float(len(topology.chains)),
        "hidden_units": float(topology.hidden_units),
        "basis_paths": float(topology.basis_paths),
        "coverage": float(topology.coverage),
        "covered_params": float(topology.covered_params),
        "plain_params": float(topology.total_params - topology.covered_params),
    }


def chain_index(chain: Chain, device: torch.device) -> list[LayerIndex]:
    """The sigma/tau indices of every layer of ``chain``, as the optimizer builds them."""
    last = len(chain.layers) - 1
    return [
        build_layer_index(layer.n_out, layer.n_in, layer.centre, hidden_out=l < last, hidden_in=l > 0, device=device)
        for l, layer in enumerate(chain.layers)
    ]


def free_tau_cols(chain: Chain, device: torch.device) -> list[Tensor | None]:
    """Per layer, the input nodes whose tau edge is free (a skeleton path), as an int64 index.

    Computed on the CPU once (boolean selection on an accelerator would synchronize), then moved.
    ``None`` for the first layer, which carries no tau edges.
    """
    out: list[Tensor | None] = [None]
    for idx in chain_index(chain, torch.device("cpu"))[1:]:
        assert idx.tau_free is not None
        out.append(torch.nonzero(idx.tau_free).flatten().to(device))
    return out


def _work(t: Tensor) -> Tensor:
    """``t`` in at least float32 (half-precision sums of squares underflow); no copy otherwise."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _chain_tensors(
    chain: Chain, grads: bool = True
) -> tuple[list[Tensor], list[Tensor], list[Tensor | None], list[Tensor | None]]:
    """3-D weights, their gradients (zeros where missing; empty if ``grads`` is false), biases, bias gradients."""
    weights = [_work(layer.weight3d().detach()) for layer in chain.layers]
    biases = [None if layer.bias is None else _work(layer.bias.detach()) for layer in chain.layers]
    if not grads:
        return weights, [], biases, []
    wgrads = [
        torch.zeros_like(w) if layer.weight.grad is None else _work(layer.weight3d(layer.weight.grad.detach()))
        for layer, w in zip(chain.layers, weights)
    ]
    bgrads: list[Tensor | None] = []
    for layer, b in zip(chain.layers, biases):
        g = None if layer.bias is None else layer.bias.grad
        bgrads.append(None if b is None else torch.zeros_like(b) if g is None else _work(g.detach()))
    return weights, wgrads, biases, bgrads


def _sq_per_pair(t: Tensor) -> Tensor:
    """``[n_out, n_in]``: the sum over taps of ``t**2`` (a fresh tensor the caller may modify)."""
    sq = t.square()
    return sq.squeeze(2) if sq.shape[2] == 1 else sq.sum(2)


def chain_basis_values(
    weights: list[Tensor], biases: list[Tensor | None], index: list[LayerIndex]
) -> tuple[list[Tensor], list[Tensor | None]]:
    """Basis-path values as fresh tensors (two elementwise passes per layer).

    Returns:
        Per layer ``v`` shaped like the weight, with its sigma entries (not coordinates) set to 0;
        per layer the hidden bias's ``v`` (``None`` for the output layer and for layers without a
        bias).
    """
    vw, vb = chain_path_values(weights, biases, index)
    for v, idx in zip(vw, index):
        if idx.sig_rows is not None:
            v[idx.sig_rows, idx.sig_cols, idx.centre] = 0
    return vw, list(vb[:-1]) + [None]


def _sq_norm(values: list[Tensor | None]) -> Tensor:
    return torch.stack([torch.linalg.vector_norm(v).square() for v in values if v is not None]).sum()


@dataclass
class ChainReading:
    """What :func:`read_chain` measures on one chain (0-d tensors unless noted).

    Attributes:
        grad_sq: Sum of ``(dL/dv)**2`` over the chain's basis paths.
        value_sq: Sum of ``v**2`` over the chain's basis paths.
        skeleton_abs: ``|v|`` of every skeleton path (1-D).
        imbalance_terms: ``log(||incoming|| / ||outgoing||)`` of every hidden unit (1-D).
        values: The basis-path values from :func:`chain_basis_values` (weights, hidden biases).
    """

    grad_sq: Tensor
    value_sq: Tensor
    skeleton_abs: Tensor
    imbalance_terms: Tensor
    values: tuple[list[Tensor], list[Tensor | None]]


def read_chain(
    weights: list[Tensor],
    grads: list[Tensor],
    biases: list[Tensor | None],
    bias_grads: list[Tensor | None],
    index: list[LayerIndex],
    tau_cols: list[Tensor | None],
) -> ChainReading:
    """Path-space norms, skeleton values and imbalance terms of one chain.

    With ``v_e = w_e B(a) F(b)`` and, for an edge ``e = (a -> b)`` that is not a tau edge,
    ``dL/dv_e = g_e / (B(a) F(b))`` (gsgd-math.md sections 2-3), the squared gradient norm of a
    layer is ``F**-2 . sum_taps(g**2) . B**-2`` less its O(H) sigma entries (not coordinates). A
    free tau edge also carries every path through its source node ``a``: its ``dL/dv`` is
    ``g_e / (B(a) F(b)) - Gamma(a) / v_e`` (``Gamma`` from :func:`chain_gamma`), added separately.
    A hidden bias gives ``v = bias F(b)`` and ``dL/dv = dL/dbias / F(b)``.

    Cost per layer, in passes over the weight: two for the path values (kept for the relative
    update), one for their norm, two for the unit norms, two for the gradient norm, and the
    ``w . g`` reduction inside :func:`chain_gamma`; no host synchronization.

    Args:
        weights: ``[n_out, n_in, taps]`` weights, input to output (float32 or wider).
        grads: Matching ``dL/dw``.
        biases: Bias per layer (or ``None``).
        bias_grads: Bias gradients per layer (``None`` where there is no bias).
        index: Sigma/tau indices per layer (:func:`chain_index`).
        tau_cols: Free tau columns per layer (:func:`free_tau_cols`).
    """
    B, F = chain_backbone(weights, index)
    gammas = chain_gamma(weights, grads, biases, bias_grads, index)
    vw, vb = chain_basis_values(weights, biases, index)
    last = len(weights) - 1
    grad_sq = torch.zeros((), dtype=weights[0].dtype, device=weights[0].device)
    skeleton: list[Tensor] = []
    terms: list[Tensor] = []
    incoming: Tensor | None = None
    for l, (w, g, idx) in enumerate(zip(weights, grads, index)):
        if incoming is not None:  # this layer's columns are the previous hidden units' outgoing weights
            outgoing = torch.linalg.vector_norm(w, dim=(0, 2)).square()
            terms.append(0.5 * (torch.log(incoming) - torch.log(outgoing)))
        if l < last:
            incoming = torch.linalg.vector_norm(w, dim=(1, 2)).square()
            bias, gb = biases[l], bias_grads[l]
            if bias is not None:
                incoming = incoming + bias.square()
            if gb is not None:
                grad_sq = grad_sq + (gb / F[l]).square().sum()
        g2 = _sq_per_pair(g)
        if idx.sig_rows is not None:
            g2[idx.sig_rows, idx.sig_cols] -= g[idx.sig_rows, idx.sig_cols, idx.centre].square()
        cols = tau_cols[l]
        if cols is not None:
            assert idx.tau_rows is not None
            rows = idx.tau_rows[cols]
            g2[rows, cols] -= g[rows, cols, idx.centre].square()
            v_tau = vw[l][rows, cols, idx.centre]
            p_tau = g[rows, cols, idx.centre] / (B[l][cols] * F[l][rows]) - gammas[l - 1][cols] / v_tau
            grad_sq = grad_sq + p_tau.square().sum()
            skeleton.append(v_tau.abs())
        grad_sq = grad_sq + torch.dot(F[l].square().reciprocal(), g2 @ B[l].square().reciprocal())
    value_sq = _sq_norm(vw + vb)
    return ChainReading(grad_sq, value_sq, torch.cat(skeleton), torch.cat(terms), (vw, vb))


def _update_sq(
    kept: tuple[list[Tensor], list[Tensor | None]],
    weights: list[Tensor],
    biases: list[Tensor | None],
    index: list[LayerIndex],
) -> Tensor:
    """``||v_now - v_kept||**2`` over the basis paths of one chain (consumes the fresh values)."""
    vw, vb = chain_basis_values(weights, biases, index)
    diffs: list[Tensor | None] = [v.sub_(k) for v, k in zip(vw, kept[0])]
    diffs += [None if v is None or k is None else v.sub_(k) for v, k in zip(vb, kept[1])]
    return _sq_norm(diffs)


class PathDiagnostics:
    """Invariant-space metrics of a model's ReLU chains, for a training loop or callback.

    Call it on logging steps only; between calls it holds nothing but index tensors (and, between
    :meth:`before_step` and :meth:`after_step`, the basis-path values: one copy of the chain weights).

    Protocol, on a step that logs:

    1. :meth:`before_step` once the gradients of the step are final and before the optimizer
       changes the weights (Lightning: ``on_before_optimizer_step``). Returns the gradient and
       weight metrics and keeps the basis-path values.
    2. :meth:`after_step` after the optimizer step (Lightning: ``on_train_batch_end``). Returns the
       relative update and the optimizer's counters, and drops the kept values.

    Cost, in elementwise passes over the chain weights (an SGD step is about one): ``before_step``
    about nine (see :func:`read_chain`), ``after_step`` four; the rest is O(hidden units). No call
    synchronizes with the host.

    Args:
        topology: The model's topology (its chains hold the live parameters).
        per_chain: Also return ``chain{i}/<name>`` for every name in :data:`PER_CHAIN_KEYS`.

    Example:
        A plain training loop (a callback does the same in its hooks)::

            diag = PathDiagnostics(topology)
            for step, (x, y) in enumerate(loader):
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                logging = step % 50 == 0
                if logging:
                    metrics = diag.before_step()
                opt.step()
                if logging:
                    metrics |= diag.after_step(opt)
                    logger.log_metrics({"gsgd/" + k: v.item() for k, v in metrics.items()}, step)
    """

    def __init__(self, topology: Topology, *, per_chain: bool = False) -> None:
        self.topology = topology
        self.per_chain = per_chain
        self._index: dict[int, tuple[torch.device, list[LayerIndex], list[Tensor | None]]] = {}
        self._kept: list[tuple[list[Tensor], list[Tensor | None]]] | None = None
        self._kept_sq: list[Tensor] = []

    def summary(self) -> dict[str, float]:
        """The fit-start numbers (see :func:`topology_summary`)."""
        return topology_summary(self.topology)

    def _indices(self, ci: int, chain: Chain) -> tuple[list[LayerIndex], list[Tensor | None]]:
        device = chain.layers[0].weight.device
        cached = self._index.get(ci)
        if cached is None or cached[0] != device:
            cached = (device, chain_index(chain, device), free_tau_cols(chain, device))
            self._index[ci] = cached
        return cached[1], cached[2]

    @torch.no_grad()
    def before_step(self) -> dict[str, Tensor]:
        """Gradient and weight metrics at the current weights; keeps what :meth:`after_step` needs.

        Gradients that are ``None`` count as zero (as in the optimizer). Non-finite gradients give a
        non-finite ``path_grad_norm``, which is what happened.

        Returns:
            The :data:`BEFORE_KEYS` (and per-chain keys if enabled) as 0-d tensors.
        """
        out: dict[str, Tensor] = {}
        readings: list[ChainReading] = []
        for ci, chain in enumerate(self.topology.chains):
            index, tau_cols = self._indices(ci, chain)
            r = read_chain(*_chain_tensors(chain), index, tau_cols)
            readings.append(r)
            if self.per_chain:
                out.update(_prefixed(f"chain{ci}/", _stats([r])))
        self._kept = [r.values for r in readings]
        self._kept_sq = [r.value_sq for r in readings]
        out.update(_stats(readings))
        return out

    @torch.no_grad()
    def after_step(self, optimizer: Any = None) -> dict[str, Tensor]:
        """The relative path-space update since :meth:`before_step`, and the optimizer's counters.

        Args:
            optimizer: A :class:`~lightning_gsgd.GSGD` (or anything with ``guard_hits`` and
                ``skipped_steps`` tensors); other optimizers and ``None`` give no counter keys.

        Returns:
            ``relative_update`` (and ``chain{i}/relative_update`` if enabled), plus ``guard_hits``
            and ``skipped_steps`` when the optimizer has them.

        Raises:
            RuntimeError: :meth:`before_step` was not called since the last :meth:`after_step`.
        """
        if self._kept is None:
            raise RuntimeError("PathDiagnostics.after_step: call before_step() before the optimizer step first")
        kept, self._kept = self._kept, None
        out: dict[str, Tensor] = {}
        diff_sq: list[Tensor] = []
        for ci, chain in enumerate(self.topology.chains):
            index, _ = self._indices(ci, chain)
            weights, _, biases, _ = _chain_tensors(chain, grads=False)
            d2 = _update_sq(kept[ci], weights, biases, index)
            diff_sq.append(d2)
            if self.per_chain:
                out[f"chain{ci}/relative_update"] = torch.sqrt(d2 / self._kept_sq[ci])
        base = torch.stack(self._kept_sq).sum()
        out["relative_update"] = torch.sqrt(torch.stack(diff_sq).sum() / base)
        if optimizer is not None and hasattr(optimizer, "guard_hits") and hasattr(optimizer, "skipped_steps"):
            device = out["relative_update"].device
            out["guard_hits"] = optimizer.guard_hits.to(device=device, dtype=torch.float32)
            out["skipped_steps"] = optimizer.skipped_steps.to(device=device, dtype=torch.float32)
        return out


def _stats(readings: list[ChainReading]) -> dict[str, Tensor]:
    skel = torch.cat([r.skeleton_abs for r in readings])
    return {
        "path_grad_norm": torch.sqrt(torch.stack([r.grad_sq for r in readings]).sum()),
        "basis_path_norm": torch.sqrt(torch.stack([r.value_sq for r in readings]).sum()),
        "skeleton_abs_min": skel.min(),
        "skeleton_abs_median": skel.median(),
        "skeleton_abs_max": skel.max(),
        "imbalance": torch.cat([r.imbalance_terms for r in readings]).std(correction=0),
    }


def _prefixed(prefix: str, metrics: dict[str, Tensor]) -> dict[str, Tensor]:
    return {prefix + k: v for k, v in metrics.items()}
