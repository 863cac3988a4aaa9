"""Exact G-SGD on torchvision's BatchNorm models: S1+S2 equivariance of five training steps (issue 15).

Run (torchvision is not a dependency of the package; use the separate venv of docs/zoo.md):

    PYTHONPATH=$PWD /path/to/timm-venv/bin/python benchmarks/bn_equivariance_torchvision.py [model ...]

For each model (``weights=None``, seed 0, 10 classes, float64, every BatchNorm with ``eps = 1e-30``
so that S2 is exact, training mode), on one fixed batch ``randn(4, 3, 32, 32)`` with a regression
target: ``detect_topology`` (default ``bn_mode="exact"``), the skeleton init, then a twin rescaled by
random S1 factors (every hidden unit: BatchNorm affines and Linear/Conv units) and S2 factors (every
row of every S2 layer and its bias), ``exp(U(-1, 1))`` each. Both take five steps of the optimizer
(momentum 0.9, weight decay 1e-4, the lr of ``LR``; dropout masks seeded per step); printed: the relative
difference of the training-mode outputs after the steps (``max|y' - y| / max|y|``), and how far the
run moved the output. Controls: ``torch.optim.SGD`` (must fail) and the authors' heuristic
(``bn_mode="authors_heuristic"``).
"""

from __future__ import annotations

import copy
import importlib
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
zt = importlib.import_module("zoo_torchvision")  # the torchvision shim, GSGD_SRC on sys.path

import torch  # noqa: E402
from torch import nn  # noqa: E402

from lightning_gsgd import GSGD, detect_topology, init_skeleton_  # noqa: E402
from lightning_gsgd.topology.skeleton import (  # noqa: E402
    random_unit_factors,
    rescale_hidden_units_,
    rescale_normalized_rows_,
)

MODELS = ("resnet18", "vgg11_bn", "densenet121")
HP = dict(momentum=0.9, weight_decay=1e-4)
# Per model, an lr at which no run clamps a path value (a clamp decided by rounding on one side only
# would make the comparison measure the guard's sensitivity, not the step's equivariance) or diverges
# (VGG-11-BN from the skeleton init has outputs of order 1e3: its squared error has large gradients).
LR = {"resnet18": 0.01, "vgg11_bn": 1e-6, "densenet121": 1e-4}
STEPS = 5


def _model(name: str) -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    m = getattr(torchvision.models, name)(weights=None, num_classes=10).double().train()
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.eps = 1e-30
    return m


@torch.no_grad()
def _rescale(topo, seed: int) -> None:
    """Random S1 factors on every hidden unit, S2 factors on every S2 row (weight row and bias)."""
    rescale_hidden_units_(topo, random_unit_factors(topo, 1.0, torch.Generator().manual_seed(seed)))
    rescale_normalized_rows_(topo, 1.0, torch.Generator().manual_seed(seed + 1))


def _forward(m: nn.Module, x: torch.Tensor, k: int) -> torch.Tensor:
    torch.manual_seed(1000 + k)  # the same dropout masks in both runs
    return m(x)


def _train(m: nn.Module, x, y, make) -> tuple[torch.Tensor, str]:
    """The output after the steps, and the guard's clamps (G-SGD only)."""
    opt = make(m)
    for k in range(STEPS):
        opt.zero_grad()
        ((_forward(m, x, k) - y) ** 2).mean().backward()
        opt.step()
    with torch.no_grad():
        out = _forward(m, x, STEPS)
    return out, f", guard {int(opt.guard_hits)}" if isinstance(opt, GSGD) else ""


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def run(name: str) -> None:
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randn(4, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for mode in ("exact", "authors_heuristic"):
        t0 = time.perf_counter()
        model = _model(name)
        topo = detect_topology(model, x, bn_mode=mode, self_check=False)
        init_skeleton_(topo)
        with torch.no_grad():
            start = _forward(model, x, STEPS)
        twin = copy.deepcopy(model)
        twin_topo = detect_topology(twin, x, bn_mode=mode, self_check=False)
        if mode == "exact":
            _rescale(twin_topo, seed=5)
        else:  # the heuristic's own topology has no S2 marks: rescale with the exact one's
            _rescale(detect_topology(twin, x, self_check=False), seed=5)
        with torch.no_grad():
            same = _rel(_forward(twin, x, STEPS), start)
        rows = []
        pristine = (copy.deepcopy(model), copy.deepcopy(twin))

        def gsgd(t):
            return lambda m: GSGD(m.parameters(), topology=t, compiled=False, lr=LR[name], **HP)

        pairs = [("GSGD", gsgd(topo), gsgd(twin_topo))]
        if mode == "exact":
            pairs.append(("SGD", *[lambda m: torch.optim.SGD(m.parameters(), lr=LR[name], **HP)] * 2))
        for label, make_a, make_b in pairs:
            # the topologies hold the parameters of model and twin themselves
            a, b = (model, twin) if label == "GSGD" else pristine
            (out_a, ga), (out_b, gb) = _train(a, x, y, make_a), _train(b, x, y, make_b)
            rows.append(f"{label}: {_rel(out_b, out_a):.1e} (moved {_rel(out_a, start):.1e}{ga}{gb})")
        print(
            f"| {name} | {mode} | s1 {topo.s1_units} s2 {topo.s2_rows} cov {100 * topo.coverage:.1f}% | "
            f"twin before {same:.1e} | {' | '.join(rows)} | {time.perf_counter() - t0:.0f} s |",
            flush=True,
        )


def main() -> None:
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, float64, BatchNorm eps 1e-30, {STEPS} steps, {HP}, lr {LR}")
    for name in sys.argv[1:] or MODELS:
        run(name)


if __name__ == "__main__":
    main()
