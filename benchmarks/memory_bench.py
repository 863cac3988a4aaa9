"""Optimizer memory: GSGD vs torch.optim.SGD with momentum, after a few steps on each model.

Usage (from the repository root)::

    PYTHONPATH=$PWD python benchmarks/memory_bench.py

Columns: bytes of optimizer state (``optimizer.state`` tensors: the momentum buffers, plus GSGD's
three counters), GSGD's internal caches (index plans and per-chain work areas: O(hidden units x
depth), rebuilt at will, not in ``state_dict``), the ratio of GSGD's state (and state plus caches)
to SGD's, the largest single GSGD cache tensor (no tensor is per path), and the bytes allocated
inside one ``step()`` (temporaries, from the torch profiler's memory events; torch's SGD with
weight decay allocates one gradient-sized temporary per parameter). Target (issue 6): state <= 1.1x
SGD-with-momentum state.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks._common import MODELS, build, fixed_grads, header
from lightning_gsgd import GSGD, detect_topology


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    if isinstance(opt, GSGD):
        total += sum(c.numel() * c.element_size() for c in opt._counters.tensors.values())
    return total


def _cache_bytes(opt: GSGD) -> tuple[int, int]:
    tensors = []
    for plan in opt._caches.plans.values():
        tensors += [v for v in vars(plan).values() if isinstance(v, torch.Tensor)] + list(plan.sel)
    for work in opt._caches.work.values():
        tensors += [work.vec, work.ones_h, work.scratch]
    sizes = [t.numel() * t.element_size() for t in tensors]
    return sum(sizes), max(sizes, default=0)


def _step_alloc_bytes(opt: torch.optim.Optimizer) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    args = ap.parse_args()
    print(header("optimizer memory, cpu float32, momentum 0.9, weight decay 5e-4"))
    print(
        "| model | params MB | SGD state MB | GSGD state MB | GSGD caches MB | state ratio | "
        "(state + caches) ratio | largest cache tensor kB | SGD step allocs MB | GSGD step allocs MB |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    mb = 1 / 2**20
    for name in args.models:
        model, _, x, y = build(name)
        grads = fixed_grads(model, x, y)
        opts = {}
        for kind in ("gsgd", "sgd"):
            m = copy.deepcopy(model)
            for p, g in zip(m.parameters(), grads):
                p.grad = g.clone()
            hyper = dict(lr=1e-6, momentum=0.9, weight_decay=5e-4)
            if kind == "gsgd":
                opts[kind] = GSGD(m.parameters(), topology=detect_topology(m, x), **hyper)
            else:
                opts[kind] = torch.optim.SGD(m.parameters(), **hyper)
            for _ in range(3):
                opts[kind].step()
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        sgd, gsgd = _state_bytes(opts["sgd"]), _state_bytes(opts["gsgd"])
        cache, largest = _cache_bytes(opts["gsgd"])
        alloc_sgd, alloc_gsgd = _step_alloc_bytes(opts["sgd"]), _step_alloc_bytes(opts["gsgd"])
        print(
            f"| {name} | {params * mb:.2f} | {sgd * mb:.2f} | {gsgd * mb:.2f} | {cache * mb:.3f} | "
            f"**{gsgd / sgd:.3f}** | {(gsgd + cache) / sgd:.3f} | {largest / 1024:.1f} | "
            f"{alloc_sgd * mb:.2f} | {alloc_gsgd * mb:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
