"""What detect_topology finds on torchvision's classification models, and how long its refusals are.

Run (torchvision is not a dependency of the package; use the separate venv of docs/zoo.md):

    PYTHONPATH=$PWD /path/to/timm-venv/bin/python benchmarks/zoo_torchvision.py [model ...]

For every classification model of ``torchvision.models`` (``weights=None``, float32, eval, seed 0,
one thread) on a 1x3x64x64 input (224x224 for the models that need it):
  1. ``detect_topology(model, x)`` in the default mode (``bn_mode="sgd"``, self-check on): its time, and
     the length of its error message (0: no error). On an error, the topology comes from the
     exception (``TopologyError.topology``; an older package without it: a second run with
     ``allow_empty=True``);
  2. the exact coverage (``Topology.coverage``) and the largest reason group of the excluded
     parameters (by values; ``Excluded.group``, or the reason itself in an older package);
  3. ``detect_topology(model, x, allow_empty=True, bn_mode="authors_heuristic")``: coverage by the
     chains plus the BatchNorm heuristic's layers.
Models over 250M parameters are skipped (building and tracing them takes minutes on 2 cores), and
so is any model that fails to build or run; both are printed with the reason.
"""

from __future__ import annotations

import importlib
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
# zoo_timm installs the torchvision import shim (before torchvision is imported) and puts GSGD_SRC
# (default: this repository) first on sys.path; it imports timm too.
importlib.import_module("zoo_timm")

import torch  # noqa: E402
import torchvision  # noqa: E402
from torchvision import models  # noqa: E402

import lightning_gsgd  # noqa: E402
from lightning_gsgd import TopologyError, detect_topology  # noqa: E402

torch.set_num_threads(1)

# Over 250M parameters (torchvision's model table): minutes to build and trace on 2 cores.
TOO_BIG = {"vit_h_14": 632, "regnet_y_128gf": 645, "vit_l_16": 304, "vit_l_32": 306}
NEEDS_224 = ("vit_", "maxvit_", "swin_")


def _input(name: str) -> torch.Tensor:
    side = 224 if name.startswith(NEEDS_224) else (80 if name == "inception_v3" else 64)
    return torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(1))


def _top_reason(topo) -> str:
    by: dict[str, int] = {}
    for e in topo.excluded:
        key = getattr(e, "group", "") or e.reason
        by[key] = by.get(key, 0) + e.numel
    if not by:
        return "-"
    key = max(by, key=by.get)
    return f"{key[:90]} ({100 * by[key] / max(topo.total_params, 1):.0f}%)"


def probe(name: str) -> dict:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = models.get_model(name, weights=None).eval()
    t_build = time.perf_counter() - t0
    x = _input(name)
    t0 = time.perf_counter()
    try:
        topo, msg = detect_topology(model, x), ""
    except TopologyError as e:
        msg = str(e)
        topo = getattr(e, "topology", None)
    t_detect = time.perf_counter() - t0
    if topo is None:
        topo = detect_topology(model, x, allow_empty=True)
    heur = detect_topology(model, x, allow_empty=True, bn_mode="authors_heuristic")
    bn_cov = (heur.covered_params + heur.bn_heuristic_params) / max(heur.total_params, 1)
    return dict(
        name=name,
        params=sum(p.numel() for p in model.parameters()),
        side=x.shape[-1],
        chains=len(topo.chains),
        coverage=topo.coverage,
        bn_coverage=bn_cov,
        t_build=t_build,
        t_detect=t_detect,
        msg_len=len(msg),
        msg_bn="bn_mode" in msg,
        top=_top_reason(topo),
        msg=msg,
    )


def main(names: list[str]) -> None:
    print(f"# torch {torch.__version__}, torchvision {torchvision.__version__}, package {lightning_gsgd.__file__}")
    print(
        "| model | params | input | chains | exact coverage | coverage, bn_mode=authors_heuristic | detect (s) "
        "| default-mode error (chars) | top reason for plain SGD (share of values) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    longest = None
    for name in names:
        if name in TOO_BIG:
            print(f"| {name} | {TOO_BIG[name]}M | skipped: too slow to build and trace on 2 cores |||||||")
            continue
        try:
            r = probe(name)
        except Exception as e:  # report and go on
            print(f"| {name} | failed: {type(e).__name__}: {str(e)[:120]} |||||||")
            continue
        print(
            f"| {r['name']} | {r['params'] / 1e6:.1f}M | {r['side']} | {r['chains']} | {100 * r['coverage']:.1f}% | "
            f"{100 * r['bn_coverage']:.1f}% | {r['t_detect']:.1f} | {r['msg_len']}{' (bn_mode)' if r['msg_bn'] else ''}"
            f" | {r['top']} |",
            flush=True,
        )
        if longest is None or r["msg_len"] > longest["msg_len"]:
            longest = r
    if longest is not None and longest["msg"]:
        print(f"\n# longest default-mode error: {longest['name']}, {longest['msg_len']} characters:\n{longest['msg']}")


if __name__ == "__main__":
    main(sys.argv[1:] or models.list_models(module=models))
