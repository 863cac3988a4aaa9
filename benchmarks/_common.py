"""Shared pieces of the benchmarks: fixed gradients, interleaved timing, the header line.

The models are those of the project's one model zoo, ``tests/models.py`` (``BENCH_MODELS``).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from lightning_gsgd import detect_topology, init_skeleton_, random_unit_factors, rescale_hidden_units_
from tests.models import BENCH_MODELS as MODELS


def header(title: str) -> str:
    """Machine, torch version, threads and load average: printed above every table."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"## {title}\n"
        f"machine: {cpu}, {os.cpu_count()} cpus | torch {torch.__version__} | "
        f"threads {torch.get_num_threads()} | loadavg (1/5/15 min) {load}"
    )


INITS = ("skeleton", "rescaled")


def build(name: str, *, init: str = "skeleton", device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A model, its topology, an input batch and integer labels.

    ``init``: ``"skeleton"`` (sigma and tau weights 1, so every ``B`` is 1 and the step scales rows
    only) or ``"rescaled"`` (the same function after random positive rescaling of every hidden
    unit: ``B != 1``, the step's general outer-product form; G-SGD behaves identically on both).
    """
    factory, shape = MODELS[name]
    torch.manual_seed(seed)
    model = factory()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*shape, generator=g)
    y = torch.randint(0, 10, (shape[0],), generator=g)
    topo = detect_topology(model, x)
    init_skeleton_(topo)
    if init == "rescaled":
        rescale_hidden_units_(topo, random_unit_factors(topo, 1.0, torch.Generator().manual_seed(seed + 2)))
    elif init != "skeleton":
        raise ValueError(f"unknown init {init!r}; expected one of {INITS}")
    model = model.to(device=device, dtype=dtype)
    return model, topo, x.to(device=device, dtype=dtype), y.to(device)


def fixed_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of the cross-entropy loss on one batch (detached copies)."""
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x).float(), y).backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def interleaved(
    fns: dict[str, Callable[[], None]], reps: int, warmup: int, sync: Callable[[], None]
) -> dict[str, list[float]]:
    """Time each callable ``reps`` times, round-robin (rotating the start), after ``warmup`` rounds.

    Returns:
        Seconds per call, per name, in repetition order (so ratios can be paired per round).
    """
    names = list(fns)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + reps):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            sync()
            t0 = time.perf_counter()
            fns[n]()
            sync()
            dt = time.perf_counter() - t0
            if r >= warmup:
                out[n].append(dt)
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a[i] / b[i] (both timed in the same round)."""
    return statistics.median(x / y for x, y in zip(a, b))
