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


# Small enough that no run of ~100 steps on fixed gradients skips a step or trips the guard (which
# would time a different code path); checked after every row ("valid").
LR = 1e-6


def validity(opt: GSGD) -> str:
    """``ok``, or what went wrong during the timed steps (skipped steps, guard hits, non-finite weights)."""
    bad = []
    if int(opt.skipped_steps):
        bad.append(f"{int(opt.skipped_steps)} skipped")
    if int(opt.guard_hits):
        bad.append(f"{int(opt.guard_hits)} guard hits")
    if not all(bool(torch.isfinite(p).all()) for g in opt.param_groups for p in g["params"]):
        bad.append("non-finite weights")
    return ", ".join(bad) or "ok"


def make_optimizers(model, x, grads, hyper, lr: float):
    """Copies of ``model`` with ``grads`` attached, each with its optimizer's step callable: GSGD (eager
    and ``compiled=True``; the warm-up rounds include the compilation) and torch's SGD (foreach off,
    on, fused)."""
    fns = {}
    opts = {}
    for name in ("gsgd", "gsgd_compiled", "sgd", "sgd_foreach", "sgd_fused"):
        m = copy.deepcopy(model)
        for p, g in zip(m.parameters(), grads):
            p.grad = g.clone()
        if name.startswith("gsgd"):
            opt = GSGD(m.parameters(), lr=lr, topology=detect_topology(m, x), compiled=name == "gsgd_compiled", **hyper)
        else:
            kind = {"sgd": dict(foreach=False), "sgd_foreach": dict(foreach=True), "sgd_fused": dict(fused=True)}[name]
            opt = torch.optim.SGD(m.parameters(), lr=lr, **kind, **hyper)
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
    ap.add_argument(
        "--rescaled", action="store_true", help="also time a rescaled skeleton init (B != 1: the step's general form)"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    print(header(f"optimizer step, {args.device} {args.dtype}, median of {args.reps} after {args.warmup} warm-up"))
    print(
        "| model | init | config | GSGD ms | GSGD compiled ms | SGD ms | SGD foreach ms "
        "| GSGD / best of SGD, SGD foreach | compiled / best of SGD, SGD foreach "
        "| SGD fused ms | GSGD / SGD fused | compiled / SGD fused | valid |\n"
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    )
    inits = ["skeleton", "rescaled"] if args.rescaled else ["skeleton"]
    for mname in args.models:
        for init in inits:
            model, _, x, y = build(mname, init=init, device=args.device, dtype=dtype)
            grads = fixed_grads(model, x, y)
            for cname, hyper in CONFIGS.items():
                fns, opts = make_optimizers(model, x, grads, hyper, lr=LR)
                t = interleaved(fns, args.reps, args.warmup, sync)
                best = "sgd" if median(t["sgd"]) <= median(t["sgd_foreach"]) else "sgd_foreach"
                valid = [validity(opts[n]) for n in ("gsgd", "gsgd_compiled")]
                print(
                    f"| {mname} | {init} | {cname} | "
                    f"{1e3 * median(t['gsgd']):.3f} | {1e3 * median(t['gsgd_compiled']):.3f} | "
                    f"{1e3 * median(t['sgd']):.3f} | {1e3 * median(t['sgd_foreach']):.3f} | "
                    f"**{paired_ratio(t['gsgd'], t[best]):.2f}** | "
                    f"**{paired_ratio(t['gsgd_compiled'], t[best]):.2f}** | "
                    f"{1e3 * median(t['sgd_fused']):.3f} | {paired_ratio(t['gsgd'], t['sgd_fused']):.2f} | "
                    f"{paired_ratio(t['gsgd_compiled'], t['sgd_fused']):.2f} | "
                    f"{'ok' if valid == ['ok', 'ok'] else ' / '.join(valid)} |",
                    flush=True,
                )
    print(f"loadavg after: {', '.join(f'{v:.2f}' for v in __import__('os').getloadavg())}")


if __name__ == "__main__":
    main()
