"""The G-SGD authors' heuristic for layers whose outputs are normalized by BatchNorm (pure functions).

A Linear/Conv layer followed by BatchNorm is scale-invariant per *output* channel, which is not the
per-hidden-unit symmetry G-SGD is built on, so such layers are not part of any exact chain. The
authors' CNN code (Meng et al., ICLR 2019, CIFAR PlainNet/ResNet experiments) updates them with a
heuristic instead (docs/math.md, "Residual networks and BatchNorm"). With the weight seen as ``[n_out, n_in, taps]`` and
``n[o, t] = || W[o, :, t] ||_2`` (the norm over input channels at tap ``t``):

* every non-skeleton entry ``W[o, i, t]`` gets the gradient ``g[o, i, t] * n[o, t]``;
* the skeleton entry of output channel ``o`` (``W[o, o mod n_in, centre]``, the sigma edge of
  docs/math.md, "The sigma/tau basis") gets ``g[o, o mod n_in, centre] / n[o, centre]``;

and the layer then takes an ordinary SGD step (momentum, dampening, Nesterov) on that direction.
Weight decay is added to the raw gradient first, as ``torch.optim.SGD`` does. This is **not** an
exact path-space method and carries no invariance guarantee; it exists to reproduce the paper's
BatchNorm experiments. Biases of such layers (usually absent) and BatchNorm's affine parameters get
plain SGD.

Nothing here imports Lightning or reads optimizer state: inputs in, new tensors out.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Lower bound on ``n[o, centre]`` in the skeleton division (a channel whose centre weights are all
#: zero would otherwise divide by zero).
NORM_FLOOR = 1e-12


def bn_heuristic_direction(w3: Tensor, g3: Tensor, centre: int) -> Tensor:
    """The heuristic's gradient for a ``[n_out, n_in, taps]`` weight ``w3`` and gradient ``g3``.

    Args:
        w3: The layer's weight as ``[n_out, n_in, taps]``.
        g3: The gradient (weight decay included), same shape.
        centre: The tap of the skeleton entries (kernel centre).

    Returns:
        A new tensor: ``g3 * n`` off the skeleton, ``g3 / n`` on it.
    """
    n_out, n_in, _ = w3.shape
    norms = torch.linalg.vector_norm(w3, dim=1)  # [n_out, taps]
    out = g3 * norms.unsqueeze(1)
    rows = torch.arange(n_out, device=w3.device)
    cols = rows % n_in
    out[rows, cols, centre] = g3[rows, cols, centre] / norms[rows, centre].clamp_min(NORM_FLOOR)
    return out


def bn_heuristic_step(
    w3: Tensor,
    g3: Tensor,
    buf: Tensor | None,
    centre: int,
    *,
    lr: float | Tensor,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """One step of the authors' BatchNorm heuristic on one layer.

    Args:
        w3: Weight as ``[n_out, n_in, taps]``.
        g3: Its gradient, same shape.
        buf: The momentum buffer from the previous step (``None`` at first).
        centre: The tap of the skeleton entries.
        lr: Learning rate.
        momentum: Momentum factor.
        dampening: Dampening for momentum.
        weight_decay: L2 penalty, added to the gradient before the heuristic scaling.
        nesterov: Nesterov momentum.

    Returns:
        ``(new_weight, new_buffer)``, new tensors (``new_buffer`` is ``None`` without momentum).
    """
    g = g3 + weight_decay * w3 if weight_decay != 0 else g3
    d = bn_heuristic_direction(w3, g, centre)
    if momentum != 0:
        buf = d.clone() if buf is None else buf * momentum + d * (1 - dampening)
        d = d + momentum * buf if nesterov else buf
    else:
        buf = None
    return w3 - lr * d, buf
