"""Which hidden layers the rescaling self-check cannot test: their units do not affect the output.

The compensated rescaling of :func:`lightning_gsgd.topology.selfcheck.check_invariance` sees a wrong
link ``a -> b`` only through ``a``'s contribution to the output. Where that contribution is zero on
the example (behind a zero gain, or all units dead after ReLU), the check passes whatever the link
computes. :func:`untested_layers` finds those layers so that detection can say so.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gsgd.topology.graph import call_model
from lightning_gsgd.topology.selfcheck import eval_mode, float_leaves, output_deviation, resolve_tolerance
from lightning_gsgd.topology.types import Topology


def _unit_directions(n: int, spread: float, generator: torch.Generator) -> Tensor:
    """Random per-unit log-factors with ``spread / 2 <= |u| <= spread`` (never close to the identity)."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    sign = torch.rand(n, generator=generator, dtype=torch.float64) < 0.5
    return torch.where(sign, -1.0, 1.0) * spread * (0.5 + 0.5 * u)


@torch.no_grad()
def _scaled_alone_output(model: nn.Module, layer: Any, c: Tensor, example_input: Any) -> Any:
    """The model's output with ``layer``'s incoming weights, bias and tied parameters times ``c`` per unit,
    nothing compensated."""
    params = layer.params()
    saved = [p.detach().clone() for p in params]
    try:
        c = c.to(layer.weight)
        layer.weight3d().mul_(c.view(-1, 1, 1))
        if layer.bias is not None:
            layer.bias.mul_(c)
        for t in layer.tied:
            t.mul_(c)
        return call_model(model, example_input)
    finally:
        for p, v in zip(params, saved):
            p.copy_(v)


def _live_by_gradient(
    model: nn.Module, layers: list[Any], example_input: Any, scale: float, tol: float, generator: torch.Generator
) -> list[bool]:
    """For each chain layer: whether scaling one of its units by ``e`` (no compensation) changes the
    output, to first order, by more than ``tol`` relative to ``scale`` (2-norm), from one forward and
    one backward pass for all layers together. ``False`` means "not shown", not "silent".

    A gate of ones, requiring gradients, multiplies each layer's output per unit (forward hooks);
    the model's parameters are switched to ``requires_grad=False`` meanwhile, so the backward pass
    computes only the gates' gradients ``g_j = <r, dy/ds_j>`` for a random ``r``, and
    ``||dy/ds_j||_2 >= |g_j| / ||r||_2``.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    gates: list[Tensor] = []
    handles = []
    try:
        for layer in layers:
            mod = model.get_submodule(layer.name)
            gate = torch.ones(layer.n_out, dtype=layer.weight.dtype, device=layer.weight.device, requires_grad=True)
            last = isinstance(mod, nn.Linear)  # units on the last dim; convs and BatchNorms: on dim 1

            def hook(m: nn.Module, args: Any, out: Tensor, gate: Tensor = gate, last: bool = last) -> Tensor:
                return out * gate.view((-1,) if last else (-1,) + (1,) * (out.dim() - 2))

            handles.append(mod.register_forward_hook(hook))
            gates.append(gate)
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            leaves = [t for t in float_leaves(call_model(model, example_input)) if t.requires_grad]
            if not leaves:
                return [False] * len(layers)
            rs = [torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t) for t in leaves]
            s = sum((r * t).sum() for r, t in zip(rs, leaves))
            grads = torch.autograd.grad(s, gates, allow_unused=True)
    except Exception:  # noqa: BLE001  (a forward that cannot run with autograd: fall back to forward passes)
        return [False] * len(layers)
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    r2 = math.sqrt(sum(float(r.double().square().sum()) for r in rs))
    return [g is not None and float(g.double().abs().max()) / (r2 * scale) > tol for g in grads]


def untested_layers(
    model: nn.Module,
    topology: Topology,
    example_input: Any,
    *,
    tolerance: float | None = None,
    spread: float = 1.0,
    generator: torch.Generator | None = None,
    reference: Any = None,
) -> list[tuple[int, int]]:
    """Hidden layers about which the rescaling self-check proves nothing on ``example_input``.

    The compensated rescaling of :func:`check_invariance` can only see a wrong link ``a -> b`` if
    ``a``'s units contribute to the output. Here each hidden layer's units are scaled **without**
    compensation (incoming weights and bias times ``c = exp(u)``, ``spread / 2 <= |u| <= spread``,
    the next layer left alone): if even that moves the output by no more than the tolerance, the
    units' contribution is zero on this example (behind a zero gain, or dead after ReLU) and the
    layer is *untested*.

    Cost: one forward and one backward pass with gradients for all layers together (a layer whose
    first-order output change provably exceeds the tolerance is live), then one forward pass (no
    gradients) per layer not shown live that way; with at most two hidden layers, just one forward
    pass per layer. Parameters and training flags are restored as in :func:`invariance_error`.

    Returns:
        ``(chain, layer)`` index pairs of the untested hidden layers, in order.
    """
    hidden_idx = [(ci, li) for ci, chain in enumerate(topology.chains) for li in chain.hidden_layers]
    if not hidden_idx:
        return []
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    with eval_mode(model):
        with torch.no_grad():
            ref = call_model(model, example_input) if reference is None else reference
        leaves = float_leaves(ref)
        tol = resolve_tolerance(ref, tolerance)
        scale = max((float(t.double().abs().max()) for t in leaves if t.numel()), default=0.0) or 1.0
        hidden = []
        for ci, li in hidden_idx:
            layer = topology.chains[ci].layers[li]
            hidden.append((layer, _unit_directions(layer.n_out, spread, gen)))
        if len(hidden) > 2:
            live = _live_by_gradient(model, [layer for layer, _ in hidden], example_input, scale, tol, gen)
        else:
            live = [False] * len(hidden)
        out: list[tuple[int, int]] = []
        for (ci, li), (layer, u), shown in zip(hidden_idx, hidden, live):
            if shown:
                continue
            if output_deviation(ref, _scaled_alone_output(model, layer, u.exp(), example_input)) <= tol:
                out.append((ci, li))
    return out
