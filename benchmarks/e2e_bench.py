"""End-to-end training-step time (zero_grad + forward + backward + step): GSGD vs torch.optim.SGD.

Usage (from the repository root)::

    PYTHONPATH=$PWD python benchmarks/e2e_bench.py [--reps 60] [--warmup 10] [--batch 128] [--model NAME]

MLP 784-1024-1024-1024-10 by default, or any model of ``tests/models.py``'s ``BENCH_MODELS``
(``--model "resnet18 BN 32x32"``: BatchNorm segments; skeleton-initialized), cross-entropy on a
fixed random batch, momentum 0.9 and weight decay 5e-4 for every optimizer. The optimizers run
round-robin on their own copies of the model, so the overhead is a paired ratio within each round.
Target (issue 6): <= 6% over the faster torch SGD.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
from torch import nn

from benchmarks._common import MODELS, build, header, interleaved, median, paired_ratio
from lightning_gsgd import GSGD, detect_topology

MODEL = "mlp 784-1024x3-10"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--model", default=MODEL, choices=list(MODELS))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, _, x, y = build(args.model)
    x = torch.randn(args.batch, *x.shape[1:], generator=torch.Generator().manual_seed(5))
    y = torch.randint(0, 10, (args.batch,), generator=torch.Generator().manual_seed(6))
    hyper = dict(lr=args.lr, momentum=0.9, weight_decay=5e-4)
    models, opts = {}, {}
    for name in ("gsgd", "gsgd_compiled", "sgd", "sgd_foreach"):
        m = copy.deepcopy(model)
        if name.startswith("gsgd"):
            compiled = name == "gsgd_compiled"
            opts[name] = GSGD(m.parameters(), topology=detect_topology(m, x), compiled=compiled, **hyper)
        else:
            opts[name] = torch.optim.SGD(m.parameters(), foreach=name == "sgd_foreach", **hyper)
        models[name] = m

    step_times: dict[str, list[float]] = {n: [] for n in models}

    def train_step(name: str):
        m, opt = models[name], opts[name]

        def run() -> None:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(m(x), y).backward()
            t0 = time.perf_counter()
            opt.step()
            step_times[name].append(time.perf_counter() - t0)

        return run

    print(header(f"training step (forward + backward + step), {args.model}, batch {args.batch}, cpu float32"))
    t = interleaved({n: train_step(n) for n in models}, args.reps, args.warmup, lambda: None)
    best = "sgd" if median(t["sgd"]) <= median(t["sgd_foreach"]) else "sgd_foreach"
    ratio = paired_ratio(t["gsgd"], t[best])
    ratio_c = paired_ratio(t["gsgd_compiled"], t[best])
    print("| optimizer | median ms per training step | of which optimizer.step (median ms) |\n|---|---:|---:|")
    for n in models:
        print(f"| {n} | {1e3 * median(t[n]):.2f} | {1e3 * median(step_times[n][args.warmup :]):.2f} |")
    print(f"\nGSGD overhead over the faster torch SGD ({best}), paired median: **{100 * (ratio - 1):+.1f}%**")
    print(f"GSGD(compiled=True) overhead over it, paired median: **{100 * (ratio_c - 1):+.1f}%**")
    for n in ("gsgd", "gsgd_compiled"):
        gs = opts[n]
        print(
            f"{n} counters after the run: steps {int(gs.steps)}, skipped {int(gs.skipped_steps)}, guard hits "
            f"{int(gs.guard_hits)}"
        )
    print(f"loadavg after: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
