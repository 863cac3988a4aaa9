"""The S2 self-check: rows claimed as normalized by BatchNorm must be free to rescale in training mode.

S2 (docs/math.md, "BatchNorm segments: S1 and S2") holds only in training mode and only as
BatchNorm's ``eps -> 0`` (with ``eps = 1e-5`` a row rescaling moves the output by about 1e-4
relative; with ``eps = 1e-30`` in float64 by about 1e-15). So the check runs on a **deep copy** of
the model in float64, in eval mode except for its BatchNorms (training mode, ``eps = 1e-30``, unless
the model trains and the BatchNorm is kept in eval mode; dropout and other training-time randomness
stay off), with the random generator forked and seeded
for each forward pass: it multiplies every claimed S2 row (weight row and bias) by a random factor
``exp(U(-1, 1))`` and compares the outputs. The user's model (parameters, buffers such as running
statistics, training flags) is never touched. If the outputs move by more than the tolerance, each
S2 layer is rescaled alone and every layer that moves them loses its claim (:func:`prove_s2`).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from lightning_gsgd.topology.graph import call_model
from lightning_gsgd.topology.rules import BATCHNORM
from lightning_gsgd.topology.selfcheck import output_deviation
from lightning_gsgd.topology.types import Chain, ChainLayer, Excluded, Topology

log = logging.getLogger(__name__)

EPS = 1e-30  # BatchNorm eps in the copy: S2 is exact as eps -> 0
TOLERANCE = 1e-9  # relative, float64
# A channel whose batch variance is below this share of its mean square is degenerate on the example
# input: BatchNorm then divides rounding noise by sqrt(eps) and the check would measure that noise.
DEGENERATE = 1e-10
GROUP = "the S2 self-check found that rescaling its rows changed the training-mode output"


def _float64(x: Any) -> Any:
    return tree_map(lambda t: t.double() if isinstance(t, Tensor) and t.is_floating_point() else t, x)


class _TrainCopy:
    """A float64 copy of the model with training-mode BatchNorms (eps 1e-30) and nothing else in training."""

    def __init__(self, model: nn.Module, example_input: Any, layers: list[ChainLayer]) -> None:
        names = {id(p): n for n, p in model.named_parameters()}
        # a BatchNorm that the user keeps in eval mode inside a model in training mode stays frozen
        modes = [not model.training or m.training for m in model.modules()]
        self.model = copy.deepcopy(model).double().eval()
        for m, mode in zip(self.model.modules(), modes):
            if isinstance(m, BATCHNORM):
                m.train(mode)
                m.eps = EPS
        self.x = _float64(example_input)
        own = dict(self.model.named_parameters())
        self.rows = [
            (layer.n_out, own[names[id(layer.weight)]], None if layer.bias is None else own[names[id(layer.bias)]])
            for layer in layers
        ]
        self.saved = [[p.detach().clone() for p in (w, b) if p is not None] for _, w, b in self.rows]
        #: Training-mode BatchNorms that saw a channel without variance in the last forward pass.
        self.degenerate: list[str] = []
        for name, m in self.model.named_modules():
            if isinstance(m, BATCHNORM) and m.training:
                m.register_forward_pre_hook(self._variance_hook(name))

    def _variance_hook(self, name: str) -> Any:
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            dims = [d for d in range(x.dim()) if d != 1]
            var = x.var(dims, unbiased=False)
            if bool((var <= DEGENERATE * x.square().mean(dims)).any()):
                self.degenerate.append(name)

        return hook

    @torch.no_grad()
    def run(self) -> Any:
        devices = [self.x.device] if isinstance(self.x, Tensor) and self.x.is_cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(0)
            return call_model(self.model, self.x)

    @torch.no_grad()
    def rescaled(self, which: list[int], spread: float, generator: torch.Generator) -> Any:
        """The output with the rows of layers ``which`` times random factors; the copy is restored after."""
        try:
            for k in which:
                n, w, b = self.rows[k]
                c = torch.exp((2 * torch.rand(n, generator=generator, dtype=torch.float64) - 1) * spread).to(w)
                w.view(n, -1).mul_(c.view(-1, 1))
                if b is not None:
                    b.mul_(c)
            return self.run()
        finally:
            for k in which:
                n, w, b = self.rows[k]
                for p, s in zip([p for p in (w, b) if p is not None], self.saved[k]):
                    p.copy_(s)


def s2_errors(
    model: nn.Module, topology: Topology, example_input: Any, *, spread: float = 1.0, tolerance: float = TOLERANCE
) -> tuple[float, list[tuple[str, float]]] | str:
    """The relative output change with every claimed S2 row rescaled, and the failing layers.

    Returns:
        ``(error, [(layer name, error alone), ...])`` (the list is empty when ``error <= tolerance``),
        or a message saying why the check could not run (the copy or its training-mode forward pass
        failed, e.g. a BatchNorm over one value per channel, or the output is random).
    """
    layers = topology.s2_layers()
    if not layers:
        return 0.0, []
    gen = torch.Generator().manual_seed(0)
    try:
        twin = _TrainCopy(model, example_input, layers)
        ref = twin.run()
        if twin.degenerate:
            return (
                f"on example_input, BatchNorm '{twin.degenerate[0]}' sees a channel without variance "
                "(a constant input such as zeros?), where BatchNorm amplifies rounding noise: pass a random "
                "example input to test the claims"
            )
        err = output_deviation(ref, twin.rescaled(list(range(len(layers))), spread, gen))
        if err <= tolerance:
            return err, []
        if output_deviation(ref, twin.run()) > tolerance:
            return "the training-mode output differs between two identical forward passes"
        bad = []
        for k, layer in enumerate(layers):
            e = output_deviation(ref, twin.rescaled([k], spread, gen))
            if e > tolerance:
                bad.append((layer.name, e))
    except Exception as exc:  # noqa: BLE001  (a model that cannot be copied or run in training mode)
        return f"{type(exc).__name__}: {exc}"
    return err, bad


def prove_s2(model: nn.Module, topology: Topology, example_input: Any) -> Topology:
    """Run the S2 check; every S2 layer that fails it loses its claim.

    A layer alone leaves ``Topology.normalized`` and its parameters go to ``excluded`` with the
    measured change; a chain's output layer stays in its chain (its S1 claims are the other check's)
    without the S2 mark. Both are logged. When the check cannot run, the claims stay (they rest on
    the structural rule) and a warning says why.
    """
    res = s2_errors(model, topology, example_input)
    if isinstance(res, str):
        if topology.s2_layers():
            log.warning(
                "detect_topology: the S2 self-check could not run (%s); the rows claimed as normalized by "
                "BatchNorm rest on the structural rule alone",
                res[:300],
            )
        return topology
    _, bad = res
    if not bad:
        return topology
    why = {
        name: f"the S2 self-check found that rescaling the rows of '{name}' changed the training-mode output by "
        f"{e:.2e} (float64, BatchNorm eps {EPS:.0e}; relative, tolerance {TOLERANCE:.0e}): they are not only "
        "normalized by BatchNorm"
        for name, e in bad
    }
    for text in why.values():
        log.warning("detect_topology: %s; the S2 claim is dropped", text)
    chains = []
    for c in topology.chains:
        keep = tuple(l for l in c.normalized if c.layers[l].name not in why)
        chains.append(c if keep == c.normalized else Chain(c.layers, c.sources, keep))
    names = {id(p): n for n, p in model.named_parameters()}
    extra = tuple(
        Excluded(names[id(p)], p.numel(), f"'{layer.name}': {why[layer.name]}", GROUP)
        for layer in topology.normalized
        if layer.name in why
        for p in (layer.weight, layer.bias)
        if p is not None
    )
    order = {n: k for k, n in enumerate(names.values())}
    excluded = tuple(sorted(topology.excluded + extra, key=lambda e: order.get(e.name, len(order))))
    return replace(
        topology,
        chains=tuple(chains),
        excluded=excluded,
        normalized=tuple(layer for layer in topology.normalized if layer.name not in why),
    )
