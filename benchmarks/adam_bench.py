"""Optimizer step time: GAdam / GAdamW vs torch.optim.Adam / AdamW (foreach on and off), interleaved.

Usage::

    PYTHONPATH=. python benchmarks/adam_bench.py [--reps 40] [--warmup 5] [--threads 1] [--models ...]

Every optimizer gets its own copy of the same (skeleton-initialized) parameters and the same fixed
gradients, with the same hyper-parameters; rounds are interleaved, so the ratios are paired within a
round. GAdam runs twice: with its default ``compiled=None`` (compiled on these models when a C++ compiler
is there: their chains hold more than 100,000 parameters; the warm-up rounds compile it) and eager
(``compiled=False``). Also reports the optimizer state's size against torch's (moments in path
coordinates have the parameters' shapes: the target is 1.0x).
"""

from __future__ import annotations

import argparse
import copy
import os

import torch

from benchmarks._common import MODELS, build, fixed_grads, header, interleaved, median, paired_ratio
from benchmarks.step_bench import validity
from lightning_gsgd import GAdam, GAdamW, detect_topology

LR = 1e-6  # small enough that no step on fixed gradients is skipped or guarded (checked: "valid")
VARIANTS = {
    "adam": (GAdam, torch.optim.Adam, {"weight_decay": 0.0}),
    "adamw wd 1e-2": (GAdamW, torch.optim.AdamW, {"weight_decay": 1e-2}),
}


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in the optimizer's per-parameter state."""
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    print(header(f"Adam step, {args.device} float32, median of {args.reps} after {args.warmup} warm-up"))
    print(
        "| model | variant | G default ms | G eager ms | torch foreach ms | torch single ms | default / foreach "
        "| eager / foreach | default / single | state G / torch | default compiled | valid |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"
    )
    for mname in args.models:
        model, _, x, y = build(mname, device=args.device)
        grads = fixed_grads(model, x, y)
        for variant, (g_cls, t_cls, hyper) in VARIANTS.items():
            fns, opts = {}, {}
            for name in ("g", "g_eager", "foreach", "single"):
                m = copy.deepcopy(model)
                for p, g in zip(m.parameters(), grads):
                    p.grad = g.clone()
                if name.startswith("g"):
                    compiled = False if name == "g_eager" else None
                    opt = g_cls(m.parameters(), lr=LR, topology=detect_topology(m, x), compiled=compiled, **hyper)
                else:
                    opt = t_cls(m.parameters(), lr=LR, foreach=name == "foreach", **hyper)
                opts[name], fns[name] = opt, opt.step
            t = interleaved(fns, args.reps, args.warmup, sync)
            print(
                f"| {mname} | {variant} | {1e3 * median(t['g']):.3f} | {1e3 * median(t['g_eager']):.3f} | "
                f"{1e3 * median(t['foreach']):.3f} | {1e3 * median(t['single']):.3f} | "
                f"**{paired_ratio(t['g'], t['foreach']):.2f}** | **{paired_ratio(t['g_eager'], t['foreach']):.2f}** | "
                f"{paired_ratio(t['g'], t['single']):.2f} | "
                f"{state_bytes(opts['g']) / state_bytes(opts['foreach']):.3f} | {opts['g'].compiled} | "
                f"{validity(opts['g'])}, {validity(opts['g_eager'])} |",
                flush=True,
            )
    print(f"loadavg after: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
