"""torch's Adam/AdamW rule, as the G-space step uses it: hyper-parameters, the step counter and bias
corrections, the moment update, and the single-tensor step of a parameter outside chains.

On the host-read path (CPU) the arithmetic is torch's non-capturable single-tensor Adam, so a parameter
outside chains matches ``torch.optim.Adam``/``AdamW`` bit for bit; off it (accelerators) the step
counter is a tensor on the parameter's device and nothing is read on the host (docs/math.md, "Adam in
path space").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_gsgd.step.single import write

#: Adam's per-parameter state keys, as ``torch.optim.Adam`` names them.
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


@dataclass(frozen=True)
class AdamHyper:
    """Adam hyper-parameters of one tensor (taken from its parameter group)."""

    lr: float | Tensor
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    amsgrad: bool
    decoupled: bool


def adam_hyper(group: dict[str, Any]) -> AdamHyper:
    """The Adam hyper-parameters of a parameter group."""
    beta1, beta2 = group["betas"]
    return AdamHyper(
        lr=group["lr"],
        beta1=float(beta1),
        beta2=float(beta2),
        eps=float(group["eps"]),
        weight_decay=float(group["weight_decay"]),
        amsgrad=bool(group["amsgrad"]),
        decoupled=bool(group["decoupled_weight_decay"]),
    )


def scalar_dtype() -> torch.dtype:
    """The dtype of torch's Adam ``step`` counter (float64 under a float64 default dtype)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


@dataclass
class Tick:
    """One tensor's step counter before and after this step, and the bias corrections it gives.

    On the host-read path (CPU) ``new`` is a Python number, as in torch's Adam without
    ``capturable``; on the synchronization-free path it is a 0-d tensor on the parameter's device.
    """

    old: Tensor | None
    new: float | Tensor
    step_size: float | Tensor
    bc2_sqrt: float | Tensor
    lr: float | Tensor


def tick(hp: AdamHyper, old: Tensor | None, like: Tensor, host_reads: bool) -> Tick:
    """The counter of tensor ``like`` whose saved ``step`` is ``old`` (``None`` before its first step).

    Off the host-read path the bias corrections are computed on ``like``'s device, in its dtype when
    that is wider than the counter's.
    """
    device = like.device
    if host_reads:  # torch's non-capturable arithmetic (a tensor lr stays a tensor, as in torch)
        new: float | Tensor = (0.0 if old is None else float(old)) + 1.0
        bc1 = 1 - hp.beta1**new
        bc2 = 1 - hp.beta2**new
        return Tick(old, new, hp.lr / bc1, bc2**0.5, hp.lr)
    base = torch.zeros((), dtype=scalar_dtype(), device=device) if old is None else old.to(device)
    t = base + 1
    tt = t.to(torch.promote_types(t.dtype, like.dtype)) if like.is_floating_point() else t
    lr_t = hp.lr.to(device=device, dtype=tt.dtype) if isinstance(hp.lr, Tensor) else hp.lr
    return Tick(old, t, lr_t / (1 - hp.beta1**tt), (1 - hp.beta2**tt).sqrt(), lr_t)


def decay_factor(hp: AdamHyper, t: Tick) -> float | Tensor:
    """AdamW's ``1 - lr wd``."""
    return 1 - t.lr * hp.weight_decay


def moments_denom(m: Tensor, q: Tensor, qmax: Tensor | None, d: Tensor, hp: AdamHyper, t: Tick) -> Tensor:
    """Update the moments in place with direction ``d`` (torch's order of operations); the denominator."""
    m.lerp_(d, 1 - hp.beta1)
    q.mul_(hp.beta2).addcmul_(d, d, value=1 - hp.beta2)
    src = q
    if hp.amsgrad:
        assert qmax is not None
        torch.maximum(qmax, q, out=qmax)
        src = qmax
    return (src.sqrt() / t.bc2_sqrt).add_(hp.eps)


def add_step(target: Tensor, num: Tensor, denom: Tensor, t: Tick) -> None:
    """``target -= step_size * num / denom`` (``num`` may be overwritten)."""
    if isinstance(t.step_size, Tensor) and isinstance(t.new, Tensor):  # no host read of a device value
        target.sub_(num.div_(denom).mul_(t.step_size))
    else:
        target.addcdiv_(num, denom, value=-t.step_size)


def plain_adam_step(p: Tensor, hp: AdamHyper, state: Any, host_reads: bool, ok: Tensor | None) -> None:
    """torch's single-tensor Adam/AdamW rule on a parameter outside chains.

    On the host-read path (``ok is None`` and ``host_reads``) the same operations as
    ``torch.optim.Adam``/``AdamW`` (``foreach=False``), so the result matches torch bit for bit; with
    ``ok`` given the step is computed on copies and applied with ``torch.where``.
    """
    assert p.grad is not None
    st = state[p]
    ensure_state(st, p, hp, host_reads)
    adam_tensor_step(st, p, p.grad, hp, host_reads, ok)


def adam_tensor_step(
    st: dict[str, Any], p: Tensor, grad: Tensor, hp: AdamHyper, host_reads: bool, ok: Tensor | None
) -> None:
    """The rule of :func:`plain_adam_step` on ``p`` with gradient ``grad`` and its state ``st`` (made
    already): on a whole parameter, or on a shard with its local state tensors."""
    t = tick(hp, st["step"], p, host_reads)
    target = p if ok is None else p.clone()
    m, q = st["exp_avg"], st["exp_avg_sq"]
    qmax = st.get("max_exp_avg_sq")
    if ok is not None:
        m, q, qmax = m.clone(), q.clone(), None if qmax is None else qmax.clone()
    if hp.weight_decay != 0:
        if hp.decoupled:
            target.mul_(decay_factor(hp, t))
        else:
            grad = grad.add(p, alpha=hp.weight_decay)
    denom = moments_denom(m, q, qmax, grad, hp, t)
    add_step(target, m.clone() if isinstance(t.new, Tensor) else m, denom, t)
    store_state(st, t, m, q, qmax, ok)
    if ok is not None:
        write(p, target, ok)


def ensure_state(st: dict[str, Any], p: Tensor, hp: AdamHyper, host_reads: bool) -> None:
    """Create torch's Adam state of ``p`` (zeros) if it has none; put ``step`` where the step reads it."""
    if "exp_avg" not in st:
        st["step"] = torch.zeros((), dtype=scalar_dtype())
        st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    if hp.amsgrad and "max_exp_avg_sq" not in st:
        st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    want = torch.device("cpu") if host_reads else p.device
    if st["step"].device != want:
        st["step"] = st["step"].to(want)


def store_state(st: dict[str, Any], t: Tick, m: Tensor, q: Tensor, qmax: Tensor | None, ok: Tensor | None) -> None:
    """Write a tensor's new step counter and moments into its state (only where ``ok`` holds)."""
    step = st["step"]
    if isinstance(t.new, Tensor):
        new = t.new.to(step.dtype)
        step.copy_(new if ok is None else torch.where(ok, new, step))
    else:
        step.fill_(t.new)
    if ok is not None:
        st["exp_avg"].copy_(torch.where(ok, m, st["exp_avg"]))
        st["exp_avg_sq"].copy_(torch.where(ok, q, st["exp_avg_sq"]))
        if qmax is not None:
            st["max_exp_avg_sq"].copy_(torch.where(ok, qmax, st["max_exp_avg_sq"]))
