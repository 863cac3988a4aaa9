"""Invariant-space diagnostics of a ReLU network: pure tensor code, no Lightning.

Everything here is measured in the coordinates G-SGD works in (docs/math.md, "The sigma/tau basis" and "The
inverse chain rule"): the basis-path values ``v`` of every chain of a
:class:`~lightning_gsgd.topology.types.Topology`, and the gradient ``dL/dv`` obtained from ordinary weight
gradients by the inverse chain rule. Path-space quantities do not change when hidden units are positively
rescaled; ``imbalance`` is the weight-space quantity that does.

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
* **guard_hits** / **skipped_steps** / **steps**: the optimizer's cumulative counters (tau path
  values the guard clamped; steps skipped for non-finite gradients; steps taken), as floats.

Use :class:`PathDiagnostics` from a training loop or callback; its per-chain building blocks are in
:mod:`lightning_gsgd.diagnostics.chain`. Every value is a 0-d floating tensor on the parameters' device; nothing calls
``.item()`` or synchronizes with the host, so a caller decides when (and whether) to pay for it.
The optional output-invariance check is :func:`lightning_gsgd.topology.selfcheck.invariance_error`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_gsgd.diagnostics.chain import (
    FlatIndex,
    PathValues,
    chain_tensors,
    flat_index,
    free_tau_cols,
    read_chain,
    update_sq,
)
from lightning_gsgd.diagnostics.sharded import read_chain_sharded, sharded_update_sq
from lightning_gsgd.step.slots import ChainReading
from lightning_gsgd.topology.index import LayerIndex, chain_index
from lightning_gsgd.topology.shard import is_sharded
from lightning_gsgd.topology.types import Chain, Topology

#: Keys of :func:`topology_summary`.
SUMMARY_KEYS = (
    "chains",
    "hidden_units",
    "basis_paths",
    "coverage",
    "covered_params",
    "plain_params",
    "s1_units",
    "s2_rows",
)
#: Keys that :meth:`PathDiagnostics.before_step` returns (without per-chain keys).
BEFORE_KEYS = (
    "path_grad_norm",
    "basis_path_norm",
    "skeleton_abs_min",
    "skeleton_abs_median",
    "skeleton_abs_max",
    "imbalance",
)
#: The optimizer counters :meth:`PathDiagnostics.after_step` reports (a ``GSGD`` has all three).
COUNTER_KEYS = ("guard_hits", "skipped_steps", "steps")
#: Keys that :meth:`PathDiagnostics.after_step` returns (the counters only with a G-SGD optimizer).
AFTER_KEYS = ("relative_update",) + COUNTER_KEYS
#: Per-chain keys are ``f"chain{i}/{name}"`` for these names.
PER_CHAIN_KEYS = BEFORE_KEYS + ("relative_update",)


def topology_summary(topology: Topology) -> dict[str, float]:
    """The fit-start numbers, exactly as the topology reports them.

    Returns:
        ``chains`` (number of chains), ``hidden_units`` (H), ``basis_paths`` (m - H), ``coverage``
        (share of parameters in chains, in [0, 1]), ``covered_params`` and ``plain_params`` (the
        parameters outside every chain, i.e. the ones the topology lists as excluded). Note that
        the optimizer also gives each chain's *output bias* plain SGD; it is counted as covered,
        as :attr:`Topology.coverage` does. ``s1_units`` and ``s2_rows``: BatchNorm channels that are
        units, and rows whose scale BatchNorm frees (docs/math.md, "BatchNorm segments: S1 and S2").
    """
    return {
        "chains": float(len(topology.chains)),
        "hidden_units": float(topology.hidden_units),
        "basis_paths": float(topology.basis_paths),
        "coverage": float(topology.coverage),
        "covered_params": float(topology.covered_params),
        "plain_params": float(topology.total_params - topology.covered_params),
        "s1_units": float(topology.s1_units),
        "s2_rows": float(topology.s2_rows),
    }


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

    Cost: given a bound :class:`~lightning_gsgd.GSGD` (``before_step(optimizer)``, what the Lightning
    callback does), its step produces the metrics as by-products (:mod:`lightning_gsgd.step.readings`):
    a few row reductions per layer, measured at about 0.6 of a ``GSGD.step`` on the MLP
    784-1024x3-10 (one CPU thread, ``docs/diagnostics.md``), and no kept copy of the weights.
    Otherwise, in elementwise passes over the chain weights (a momentum SGD step makes three):
    ``before_step`` about eight (see :func:`~lightning_gsgd.diagnostics.chain.read_chain`), ``after_step``
    four; the rest is O(hidden units), about 3.7 times ``GSGD.step`` there. No call synchronizes with the host.

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
        # FSDP2: computed from each rank's rows plus small all_reduces (lightning_gsgd.diagnostics.sharded)
        self._sharded = is_sharded(topology)
        self._index: dict[int, tuple[torch.device, list[LayerIndex], list[FlatIndex]]] = {}
        self._kept: list[PathValues] | None = None
        self._kept_sq: list[Tensor] = []
        self._deferred: Any = None

    def summary(self) -> dict[str, float]:
        """The fit-start numbers (see :func:`topology_summary`)."""
        return topology_summary(self.topology)

    def _indices(self, ci: int, chain: Chain) -> tuple[list[LayerIndex], list[FlatIndex]]:
        device = chain.layers[0].weight.device
        cached = self._index.get(ci)
        if cached is None or cached[0] != device:
            index = chain_index(chain, device)
            cached = (device, index, flat_index(chain, index, free_tau_cols(chain, device)))
            self._index[ci] = cached
        return cached[1], cached[2]

    @torch.no_grad()
    def before_step(self, optimizer: Any = None) -> dict[str, Tensor]:
        """Gradient and weight metrics at the current weights; keeps what :meth:`after_step` needs.

        Gradients that are ``None`` count as zero (as in the optimizer). Non-finite gradients give a
        non-finite ``path_grad_norm``, which is what happened.

        Args:
            optimizer: The optimizer about to step. A :class:`~lightning_gsgd.GSGD` bound to this
                topology produces the metrics as by-products of its step (a few row reductions
                instead of these passes, see :mod:`lightning_gsgd.step.readings`): then this
                returns nothing and :meth:`after_step` returns every key. Where the step cannot
                (hyper-parameters the by-products do not cover, no gradient, the step never ran),
                this measures as usual; a chain the step did not read (no gradient, or the step never
                ran) :meth:`after_step` measures itself, at the weights the step did not change.

        Returns:
            The :data:`BEFORE_KEYS` (and per-chain keys if enabled) as 0-d tensors; empty when
            ``optimizer`` produces them.
        """
        self._deferred = None
        if optimizer is not None and getattr(optimizer, "topology", None) is self.topology:
            request = getattr(optimizer, "request_readings", None)
            if request is not None and request():
                self._deferred = optimizer
                self._kept = None
                return {}
        out: dict[str, Tensor] = {}
        readings: list[ChainReading] = []
        values: list[PathValues] = []
        for ci, chain in enumerate(self.topology.chains):
            r, v = self._read(ci, chain)
            readings.append(r)
            values.append(v)
            if self.per_chain:
                out.update(_prefixed(f"chain{ci}/", _stats([r])))
        self._kept = values
        self._kept_sq = [r.value_sq for r in readings]
        out.update(_stats(readings))
        return out

    def _read(self, ci: int, chain: Chain) -> tuple[ChainReading, PathValues]:
        index, flat = self._indices(ci, chain)
        if self._sharded:
            return read_chain_sharded(chain, index, flat)
        return read_chain(*chain_tensors(chain), index, flat, chain.normalized)

    @torch.no_grad()
    def after_step(self, optimizer: Any = None) -> dict[str, Tensor]:
        """The relative path-space update since :meth:`before_step`, and the optimizer's counters.

        Args:
            optimizer: A :class:`~lightning_gsgd.GSGD` (or anything whose ``counters()`` returns the
                ``guard_hits``, ``skipped_steps`` and ``steps`` tensors); other optimizers and ``None``
                give no counter keys.

        Returns:
            ``relative_update`` (and ``chain{i}/relative_update`` if enabled), plus the
            :data:`COUNTER_KEYS` when the optimizer has them: ``guard_hits``, ``skipped_steps`` and
            ``steps`` (steps taken; a step skipped for non-finite gradients, by G-SGD itself or by
            AMP's GradScaler, which then never calls the optimizer, is not counted). When
            :meth:`before_step` was given the optimizer, also the :data:`BEFORE_KEYS`.

        Raises:
            RuntimeError: :meth:`before_step` was not called since the last :meth:`after_step`.
        """
        deferred, self._deferred = self._deferred, None
        if deferred is not None:
            out = self._from_step(deferred)
        else:
            if self._kept is None:
                raise RuntimeError("PathDiagnostics.after_step: call before_step() before the optimizer step first")
            kept, self._kept = self._kept, None
            out = {}
            diff_sq: list[Tensor] = []
            for ci, chain in enumerate(self.topology.chains):
                index, flat = self._indices(ci, chain)
                if self._sharded:
                    d2 = sharded_update_sq(chain, kept[ci], index, flat)
                else:
                    weights, _, biases, _ = chain_tensors(chain, grads=False)
                    d2 = update_sq(kept[ci], weights, biases, index, flat, chain.normalized)
                diff_sq.append(d2)
                if self.per_chain:
                    out[f"chain{ci}/relative_update"] = torch.sqrt(d2 / self._kept_sq[ci])
            base = torch.stack(self._kept_sq).sum()
            out["relative_update"] = torch.sqrt(torch.stack(diff_sq).sum() / base)
        counters = getattr(optimizer, "counters", None)
        if counters is not None:
            device = out["relative_update"].device
            tensors = counters()
            for k in COUNTER_KEYS:
                out[k] = tensors[k].to(device=device, dtype=torch.float32)
        return out

    def _from_step(self, optimizer: Any) -> dict[str, Tensor]:
        """Every metric from the readings the optimizer's step produced; missing chains measured here.

        A chain the step did not read was not changed by it (no gradient), or the step never ran
        (AMP's GradScaler skipped it): its weights and gradients are still those of before the step,
        so it is measured now and its update is 0.
        """
        got = optimizer.last_readings() or {}
        out: dict[str, Tensor] = {}
        readings: list[ChainReading] = []
        updates: list[Tensor] = []
        for ci, chain in enumerate(self.topology.chains):
            step = got.get(ci)
            if step is None:
                r, _ = self._read(ci, chain)
                upd = torch.zeros_like(r.value_sq)
            else:
                dtype = torch.promote_types(step.grad_sq.dtype, torch.float32)
                r = ChainReading(
                    step.grad_sq.to(dtype),
                    step.value_sq.to(dtype),
                    step.skeleton_abs.to(dtype),
                    step.imbalance_terms.to(dtype),
                )
                assert step.update_sq is not None
                upd = step.update_sq.to(dtype)
            readings.append(r)
            updates.append(upd)
            if self.per_chain:
                out.update(_prefixed(f"chain{ci}/", _stats([r])))
                out[f"chain{ci}/relative_update"] = torch.sqrt(upd / r.value_sq)
        out.update(_stats(readings))
        base = torch.stack([r.value_sq for r in readings]).sum()
        out["relative_update"] = torch.sqrt(torch.stack(updates).sum() / base)
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
