"""Shared pieces of the benchmarks: models, fixed gradients, interleaved timing, the header line."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from lightning_gsgd import detect_topology, init_skeleton_, random_unit_factors, rescale_hidden_units_


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


def mlp() -> nn.Sequential:
    """MLP 784-1024-1024-1024-10 (2.9M parameters)."""
    return _mlp([784, 1024, 1024, 1024, 10])


def mlp6() -> nn.Sequential:
    """6-layer MLP with unequal widths 784-1200-600-1000-300-800-10 (2.6M parameters)."""
    return _mlp([784, 1200, 600, 1000, 300, 800, 10])


def _mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def cnn() -> nn.Sequential:
    """4 convs with 64 channels on 3x16x16 inputs, 2 max-pools, linear head (0.13M parameters)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 10),
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp 784-1024x3-10": (mlp, (128, 1, 28, 28)),
    "mlp6 784-1200-600-1000-300-800-10": (mlp6, (128, 1, 28, 28)),
    "cnn 4x conv64 16x16": (cnn, (64, 3, 16, 16)),
}


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
