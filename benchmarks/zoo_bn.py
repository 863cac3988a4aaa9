"""BatchNorm segments (``bn_mode="exact"``) on torchvision's BatchNorm models: coverage, S1/S2, claims.

Run (torchvision is not a dependency of the package; use the separate venv of docs/zoo.md):

    PYTHONPATH=$PWD /path/to/timm-venv/bin/python benchmarks/zoo_bn.py [model ...]

For each model (``weights=None``, seed 0, float32, eval mode, one thread; GoogLeNet with
``aux_logits=False``: its auxiliary heads run only in training mode), on ``randn(2, 3, 64, 64)``:

1. ``detect_topology(model, x)`` (the default ``bn_mode="exact"``, self-check on): wall time, and the
   time of the same call with ``self_check=False`` (their difference is the self-check's time);
   coverage, S1 units, S2 rows, the largest reason group left to plain SGD; and the coverage of
   ``bn_mode="sgd"`` for comparison;
2. the claims, measured independently of the self-check: a float64 copy with every BatchNorm in
   training mode and ``eps = 1e-30`` (the rest in eval mode), its output on ``x``, then every claimed
   S1 unit rescaled (``rescale_hidden_units_``: gamma and beta times ``c``, the readers' columns
   divided) and every claimed S2 row multiplied by ``c`` (weight row and bias), ``c = exp(U(-1, 1))``
   drawn per unit and per row; the relative output change ``max|y' - y| / max|y|``.
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

from lightning_gsgd import detect_topology  # noqa: E402
from lightning_gsgd.topology.skeleton import (  # noqa: E402
    random_unit_factors,
    rescale_hidden_units_,
    rescale_normalized_rows_,
)

torch.set_num_threads(1)

MODELS = (
    "resnet18",
    "resnet50",
    "vgg11_bn",
    "densenet121",
    "googlenet",
    "regnet_y_400mf",
    "shufflenet_v2_x1_0",
    "mobilenet_v2",
    "efficientnet_b0",
)
KWARGS = {"googlenet": {"aux_logits": False}}
BN = nn.modules.batchnorm._BatchNorm


@torch.no_grad()
def claims_error(model: nn.Module, x: torch.Tensor, seed: int = 0) -> float:
    """Relative output change of a float64, training-mode-BatchNorm (eps 1e-30) copy when every claimed S1
    unit and S2 row is rescaled at random."""
    twin = copy.deepcopy(model).double().eval()
    topo = detect_topology(twin, x.double(), allow_empty=True, self_check=False)
    for m in twin.modules():
        if isinstance(m, BN):
            m.train()
            m.eps = 1e-30
    x64 = x.double()
    y0 = twin(x64)
    gen = torch.Generator().manual_seed(seed)
    rescale_hidden_units_(topo, random_unit_factors(topo, 1.0, gen))
    rescale_normalized_rows_(topo, 1.0, gen)
    y1 = twin(x64)
    return float((y1 - y0).abs().max() / y0.abs().max())


def probe(name: str) -> dict:
    torch.manual_seed(0)
    model = zt.models.get_model(name, weights=None, **KWARGS.get(name, {})).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    detect_topology(model, x, allow_empty=True, self_check=False)
    t_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    topo = detect_topology(model, x, allow_empty=True)
    t_full = time.perf_counter() - t0
    sgd = detect_topology(model, x, allow_empty=True, bn_mode="sgd", self_check=False)
    return dict(
        name=name,
        params=topo.total_params,
        chains=len(topo.chains),
        coverage=topo.coverage,
        sgd=sgd.coverage,
        s1=topo.s1_units,
        s2=topo.s2_rows,
        alone=len(topo.normalized),
        t_plain=t_plain,
        t_check=t_full - t_plain,
        err=claims_error(model, x),
        top=zt._top_reason(topo),
    )


def main(names: list[str]) -> None:
    print(f"# torch {torch.__version__}, torchvision {zt.torchvision.__version__}")
    print(
        "| model | params | chains | coverage: sgd / exact | S1 units | S2 rows (layers alone) | detect (s) | "
        "self-check (s) | S1+S2 claims, rel. change | top reason for plain SGD (share of values) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        r = probe(name)
        print(
            f"| {r['name']} | {r['params'] / 1e6:.1f}M | {r['chains']} | {100 * r['sgd']:.1f}% / "
            f"{100 * r['coverage']:.1f}% | {r['s1']} | {r['s2']} ({r['alone']}) | {r['t_plain']:.1f} | "
            f"{r['t_check']:.1f} | {r['err']:.0e} | {r['top']} |",
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1:] or list(MODELS))
