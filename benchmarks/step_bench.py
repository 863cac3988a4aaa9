"""Optimizer step time: GSGD vs torch.optim.SGD (foreach off and on), interleaved in one run.

Usage::

    PYTHONPATH=. python benchmarks/step_bench.py [--reps 60] [--warmup 10] [--device cpu] [--dtype float32]

Every optimizer gets its own copy of the same (skeleton-initialized) parameters and the same fixed
gradients; the rounds are interleaved (rotating start), so the ratios are paired within a round.
"""

from __future__ import annotations

import argparse
import copy

import torch

from benchmarks._common import MODELS, build, fixed_grads, header, interleaved, median, paired_ratio
from lightning_gsgd import GSGD, detect_topology

CONFIGS = {
    "momentum 0.9, wd 5e-4": dict(momentum=0.9, weight_decay=5e-4),
    "plain (no momentum, no wd)": dict(momentum=0.0, weight_decay=0.0),
}


def make_optimizers(model, x, grads, hyper, lr: float, skeleton: bool = True):
    """Three copies of ``model`` with ``grads`` attached, each with its optimizer's step callable."""
    fns = {}
    opts = {}
    for name in ("gsgd", "sgd", "sgd_foreach"):
        m = copy.deepcopy(model)
        for p, g in zip(m.parameters(), grads):
            p.grad = g.clone()
        if name == "gsgd":
            opt = GSGD(m.parameters(), lr=lr, topology=detect_topology(m, x), **hyper)
        else:
            opt = torch.optim.SGD(m.parameters(), lr=lr, foreach=(name == "sgd_foreach"), **hyper)
        opts[name] = opt
        fns[name] = opt.step
    return fns, opts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--default-init", action="store_true", help="also time PyTorch's default init (B != 1)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    print(header(f"optimizer step, {args.device} {args.dtype}, median of {args.reps} after {args.warmup} warm-up"))
    print(
        "| model | init | config | GSGD ms | SGD ms | SGD foreach ms | GSGD / best SGD (paired median) |\n"
        "|---|---|---|---:|---:|---:|---:|"
    )
    inits = [True, False] if args.default_init else [True]
    for mname in args.models:
        for skeleton in inits:
            model, _, x, y = build(mname, skeleton=skeleton, device=args.device, dtype=dtype)
            grads = fixed_grads(model, x, y)
            for cname, hyper in CONFIGS.items():
                fns, _ = make_optimizers(model, x, grads, hyper, lr=1e-4)
                t = interleaved(fns, args.reps, args.warmup, sync)
                best = "sgd" if median(t["sgd"]) <= median(t["sgd_foreach"]) else "sgd_foreach"
                print(
                    f"| {mname} | {'skeleton' if skeleton else 'default'} | {cname} | "
                    f"{1e3 * median(t['gsgd']):.3f} | {1e3 * median(t['sgd']):.3f} | "
                    f"{1e3 * median(t['sgd_foreach']):.3f} | {paired_ratio(t['gsgd'], t[best]):.2f} |",
                    flush=True,
                )
    print(f"loadavg after: {', '.join(f'{v:.2f}' for v in __import__('os').getloadavg())}")


if __name__ == "__main__":
    main()
