"""The floor of the step without momentum: what reading ``w`` and ``g`` once more costs here.

Usage::

    PYTHONPATH=. python benchmarks/floor_bench.py [--threads 1] [--reps 60] [--warmup 10] [--models ...]

G-SGD's step without momentum needs ``sum(w g)`` of every hidden row before it can write any weight
(``rho`` depends on every row sum through ``Gamma``: docs/math.md, "The cheap form"), so it reads
``w`` and ``g`` twice where torch's SGD reads them once. This times, interleaved in one run on the
benchmark models' own tensors and fixed gradients (lr 1e-6, no momentum, no weight decay):

* ``sgd``: torch's SGD step (foreach), the reference;
* ``read``: that extra read alone, as the compiled step does it (``row_sums(w * g)`` of every layer,
  :func:`lightning_gsgd.step.graph_chain.row_sums`, in one ``torch.compile`` graph);
* ``gsgd``: GSGD's default step (compiled on these models).

``read / sgd`` is the part of issue 18's 2.0x budget that the second read takes by itself; the rest
of the budget is what the update pass, the O(H) work and the call may use.
"""

from __future__ import annotations

import argparse
import copy
import os

import torch

from benchmarks._common import build, fixed_grads, header, interleaved, median, paired_ratio
from lightning_gsgd import GSGD, detect_topology
from lightning_gsgd.step.graph_chain import row_sums


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--models", nargs="*", default=["mlp 784-1024x3-10", "cnn 4x conv64 16x16"])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(header(f"the second read of w and g, cpu float32, median of {args.reps} after {args.warmup} warm-up"))
    print("| model | SGD ms | read ms | GSGD ms | read / SGD | GSGD / SGD |\n|---|---:|---:|---:|---:|---:|")
    for name in args.models:
        model, _, x, y = build(name)
        grads = fixed_grads(model, x, y)
        copies = {}
        for kind in ("sgd", "read", "gsgd"):
            m = copy.deepcopy(model)
            for p, g in zip(m.parameters(), grads):
                p.grad = g.clone()
            copies[kind] = m
        sgd = torch.optim.SGD(copies["sgd"].parameters(), lr=1e-6, foreach=True)
        gsgd = GSGD(copies["gsgd"].parameters(), lr=1e-6, topology=detect_topology(copies["gsgd"], x))
        weights = [p for p in copies["read"].parameters() if p.dim() > 1]
        ws = [w.view(w.shape[0], -1) for w in weights]
        gs = [w.grad.view(w.shape[0], -1) for w in weights]  # type: ignore[union-attr]
        read = torch.compile(lambda ws, gs: [row_sums(w * g) for w, g in zip(ws, gs)], dynamic=False)
        fns = {"sgd": sgd.step, "read": lambda f=read, a=ws, b=gs: f(a, b), "gsgd": gsgd.step}
        t = interleaved(fns, args.reps, args.warmup, lambda: None)
        ms = {k: 1e3 * median(v) for k, v in t.items()}
        print(
            f"| {name} | {ms['sgd']:.3f} | {ms['read']:.3f} | {ms['gsgd']:.3f} | "
            f"**{paired_ratio(t['read'], t['sgd']):.2f}** | **{paired_ratio(t['gsgd'], t['sgd']):.2f}** |"
        )
    print("loadavg after: " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))


if __name__ == "__main__":
    main()
