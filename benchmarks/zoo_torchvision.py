"""What detect_topology finds on torchvision's classification models, and how long its refusals are.

Run (torchvision is not a dependency of the package; use the separate venv of docs/zoo.md):

    PYTHONPATH=$PWD /path/to/timm-venv/bin/python benchmarks/zoo_torchvision.py [model ...]

For every classification model of ``torchvision.models`` (``weights=None``, float32, eval, seed 0,
one thread) on a 1x3x64x64 input (224x224 for the models that need it):
  1. ``detect_topology(model, x, bn_mode="sgd")`` (the default mode before issue 15; the default
     ``bn_mode="exact"`` is measured by ``benchmarks/zoo_bn.py``), self-check on: its time, and
     the length of its error message (0: no error). On an error, the topology comes from the
     exception (``TopologyError.topology``; an older package without it: a second run with
     ``allow_empty=True``);
  2. the exact coverage (``Topology.coverage``) and the largest reason group of the excluded
     parameters (by values; ``Excluded.group``, or the reason itself in an older package);
  3. ``detect_topology(model, x, allow_empty=True, bn_mode="authors_heuristic")``: coverage by the
     chains plus the BatchNorm heuristic's layers.
  4. the self-check's number: ``invariance_error`` of the default-mode topology on ``x`` (the
     relative output change when every claimed hidden unit is rescaled at random, compensated in
     every layer that reads it; float32, tolerance 1e-4), and how many chains are DAGs.
Models over 250M parameters are skipped (building and tracing them takes minutes on 2 cores), and
so is any model that fails to build or run; both are printed with the reason.

Besides torchvision's own names, ``<name>_bn_identity`` builds the model with every BatchNorm
replaced by ``nn.Identity`` and its Linear/Conv weights drawn from N(0, 2 / fan_in)
(``googlenet_bn_identity`` and ``inception_v3_bn_identity`` with ``aux_logits=False``: their
auxiliary heads run only in training mode). These variants run after the zoo by default.
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
from lightning_gsgd import TopologyError, detect_topology, invariance_error  # noqa: E402

torch.set_num_threads(1)

# Over 250M parameters (torchvision's model table): minutes to build and trace on 2 cores.
TOO_BIG = {"vit_h_14": 632, "regnet_y_128gf": 645, "vit_l_16": 304, "vit_l_32": 306}
NEEDS_224 = ("vit_", "maxvit_", "swin_")


# BatchNorm replaced by nn.Identity (issue 14's acceptance models; ResNet-50 for the timing).
BN_IDENTITY = ("googlenet", "densenet121", "inception_v3", "resnet50", "shufflenet_v2_x1_0")
VARIANT_KWARGS = {"googlenet": {"aux_logits": False}, "inception_v3": {"aux_logits": False}}


def _no_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Every BatchNorm module replaced by nn.Identity, in place, and every Linear/Conv weight drawn
    again with ``kaiming_normal_`` (fan-in, ReLU gain): without BatchNorm, torchvision's own init
    (e.g. GoogLeNet's std 0.01) lets the signal vanish, so the output would not depend on any hidden
    unit and the self-check could test nothing."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, torch.nn.Identity())
    g = torch.Generator().manual_seed(0)
    for mod in model.modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            fan_in = mod.weight[0].numel()
            with torch.no_grad():
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
    return model


def build(name: str) -> torch.nn.Module:
    """``models.get_model(name, weights=None)``; ``<name>_bn_identity``: BatchNorm replaced by Identity."""
    if name.endswith("_bn_identity"):
        base = name[: -len("_bn_identity")]
        return _no_bn(models.get_model(base, weights=None, **VARIANT_KWARGS.get(base, {})))
    return models.get_model(name, weights=None)


def _input(name: str) -> torch.Tensor:
    name = name.removesuffix("_bn_identity")
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
    model = build(name).eval()
    t_build = time.perf_counter() - t0
    x = _input(name)
    t0 = time.perf_counter()
    try:
        topo, msg = detect_topology(model, x, bn_mode="sgd"), ""
    except TopologyError as e:
        msg = str(e)
        topo = getattr(e, "topology", None)
    t_detect = time.perf_counter() - t0
    if topo is None:
        topo = detect_topology(model, x, allow_empty=True, bn_mode="sgd")
    err = invariance_error(model, topo, x) if topo.chains else float("nan")
    heur = detect_topology(model, x, allow_empty=True, bn_mode="authors_heuristic")
    bn_cov = (heur.covered_params + heur.bn_heuristic_params) / max(heur.total_params, 1)
    return dict(
        name=name,
        params=sum(p.numel() for p in model.parameters()),
        side=x.shape[-1],
        chains=len(topo.chains),
        dags=sum(not c.is_sequence for c in topo.chains),
        err=err,
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
        "| model | params | input | chains (DAG) | exact coverage | coverage, bn_mode=authors_heuristic | detect (s) "
        "| self-check | default-mode error (chars) | top reason for plain SGD (share of values) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    longest = None
    for name in names:
        if name in TOO_BIG:
            print(f"| {name} | {TOO_BIG[name]}M | skipped: too slow to build and trace on 2 cores ||||||||")
            continue
        try:
            r = probe(name)
        except Exception as e:  # report and go on
            print(f"| {name} | failed: {type(e).__name__}: {str(e)[:120]} ||||||||")
            continue
        print(
            f"| {r['name']} | {r['params'] / 1e6:.1f}M | {r['side']} | {r['chains']} ({r['dags']}) | "
            f"{100 * r['coverage']:.1f}% | {100 * r['bn_coverage']:.1f}% | {r['t_detect']:.1f} | "
            f"{'-' if r['err'] != r['err'] else format(r['err'], '.0e')} | "
            f"{r['msg_len']}{' (bn_mode)' if r['msg_bn'] else ''} | {r['top']} |",
            flush=True,
        )
        if longest is None or r["msg_len"] > longest["msg_len"]:
            longest = r
    if longest is not None and longest["msg"]:
        print(f"\n# longest default-mode error: {longest['name']}, {longest['msg_len']} characters:\n{longest['msg']}")


if __name__ == "__main__":
    main(sys.argv[1:] or models.list_models(module=models) + [f"{n}_bn_identity" for n in BN_IDENTITY])
