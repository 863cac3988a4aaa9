"""Does detect_topology claim layers of timm models that are not scale-invariant? (docs/zoo.md)

Run (timm is not a dependency of the package; use a separate venv, see docs/zoo.md):

    GSGD_SRC=$PWD /path/to/timm-venv/bin/python benchmarks/zoo_timm.py [model ...]

Env:  GSGD_SRC  directory holding the ``lightning_gsgd`` package to test (default: this repository).

For each model (pretrained=False, float64, eval):
  1. detect_topology(model, 1x3x64x64, allow_empty=True, self_check=False): chains, coverage,
     classes of the claimed modules;
  2. "init" column: relative output change after rescaling all claimed hidden units at random
     (spread 1.0) with the weights as timm initialises them, on a 2x3x64x64 input of 10*randn;
  3. "live" column: the same after every all-zero gain-like parameter (skipinit_gain, the
     ScaledStdConv2d gain of zero-init last convs, zero-init norm weights, zero-init fc weight)
     is filled with 0.7;
  4. per chain (only that chain rescaled, gains live): which chains break invariance, and for
     those the first hidden layer whose rescaling alone breaks it;
  5. the library's own self-check (self_check=True) at init and with gains live, and the layers
     it reports as untested (``Topology.untested``) at init.
Parameters are restored bit for bit after every measurement. Tolerance 1e-9 (float64).
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))

# --- torchvision shim (import before timm) -----------------------------------------------------
# The torchvision 0.28.0 wheel that matches torch 2.13.0 is a CUDA build: its _C.so needs
# libc10_cuda.so, so torchvision.extension._has_ops() is False, and two unconditional
# register_fake calls (torchvision::nms, torchvision::qnms) raise at import. If the extension does
# not load, declare just those two schemas (no kernels) in a FRAGMENT library kept alive for the
# process; the model definitions then import, and torchvision.ops.nms raises its own error.
_TV_LIB = None


def _install_tv_shim() -> bool:
    global _TV_LIB
    import importlib.util

    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    for d in spec.submodule_search_locations:
        for name in os.listdir(d):
            if name.startswith("_C.") and name.endswith((".so", ".pyd")):
                try:
                    torch.ops.load_library(os.path.join(d, name))
                    return False  # the extension loads: nothing to do
                except (OSError, RuntimeError):
                    pass
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in (
        "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
        "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    ):
        if not hasattr(torch.ops.torchvision, schema.split("(", 1)[0]):
            lib.define(schema)
    _TV_LIB = lib
    return True


_install_tv_shim()


def _import_gsgd():
    src = os.environ.get("GSGD_SRC", os.path.dirname(HERE))
    sys.path.insert(0, src)
    import lightning_gsgd

    print(f"# lightning_gsgd: {os.path.dirname(lightning_gsgd.__file__)}")
    return lightning_gsgd


gs = _import_gsgd()
import timm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from lightning_gsgd import TopologyError, detect_topology, random_unit_factors, rescale_hidden_units_  # noqa: E402

torch.set_num_threads(1)

MODELS = [
    "nf_resnet26",  # ScaledStdConv2d, skipinit_gain=0, zero gain on conv3
    "seresnet18",  # BN + SE gate (conv-relu-conv-sigmoid, multiplies the trunk)
    "resnet18",  # timm zero_init_last: bn2.weight = 0
    "resnetv2_50x1_bit",  # StdConv2d (weight standardisation) + GroupNorm, pre-act
    "nf_regnet_b0",  # ScaledStdConv2d, grouped convs, SE, zero gain on conv3
    "nf_seresnet26",  # as nf_resnet26 plus SE attention
    "nf_ecaresnet26",  # as nf_resnet26 plus ECA attention (conv1d gate)
    "repvgg_a0",  # ByobNet RepVggBlock: parallel conv+BN branches summed, identity BN
    "botnet26t_256",  # self-attention blocks (img_size=64 passed)
    "nf_resnet50",  # as nf_resnet26, deeper
    "nfnet_l0",  # ScaledStdConv2d, grouped convs, SE (plain Conv2d), SiLU
    "dm_nfnet_f0",  # ScaledStdConv2dSame, skipinit_gain, SE
    "eca_nfnet_l0",  # ECA attention, SiLU
    "test_nfnet",  # tiny NFNet
    "test_resnet",  # tiny ResNet
]
PLAIN = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
TOL = 1e-9
GAIN_WORDS = ("gain", "gamma", "scale", "alpha", "skipinit")
NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def synthetic(name: str) -> nn.Module:
    """Small ReLU nets made of timm's Linear/Conv subclasses (not timm models)."""
    from timm.layers import Conv2dSame, Linear, ScaledStdConv2d, StdConv2d

    conv = {"syn_conv2dsame_linear": Conv2dSame, "syn_stdconv2d": StdConv2d, "syn_scaledstdconv2d": ScaledStdConv2d}[
        name
    ]
    lin = Linear if name == "syn_conv2dsame_linear" else nn.Linear
    return nn.Sequential(
        conv(3, 8, 3, stride=2),
        nn.ReLU(),
        conv(8, 8, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        lin(8, 16),
        nn.ReLU(),
        lin(16, 10),
    )


SYNTHETIC = ["syn_conv2dsame_linear", "syn_stdconv2d", "syn_scaledstdconv2d"]


def build(name: str) -> nn.Module:
    if name.startswith("syn_"):
        torch.manual_seed(0)
        return synthetic(name).double().eval()
    kw = {"img_size": 64} if name.startswith(("botnet", "sebotnet", "halonet")) else {}
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kw).double().eval()


def rel_change(ref: torch.Tensor, out: torch.Tensor) -> float:
    scale = float(ref.abs().max())
    diff = float((out - ref).abs().max())
    return diff / scale if scale > 0 else diff


@torch.no_grad()
def rescaled_change(model, topo, x, ref, only_chain=None, only_layer=None, seed=0) -> float:
    gen = torch.Generator().manual_seed(seed)
    factors = random_unit_factors(topo, 1.0, gen)
    for ci, cf in enumerate(factors):
        for li in range(len(cf)):
            if (only_chain is not None and ci != only_chain) or (only_layer is not None and li != only_layer):
                cf[li] = torch.ones_like(cf[li])
    params = topo.chain_params()
    saved = [p.detach().clone() for p in params]
    try:
        rescale_hidden_units_(topo, factors)
        out = model(x)
    finally:
        for p, s in zip(params, saved):
            p.copy_(s)
    return rel_change(ref, out)


@torch.no_grad()
def revive_gains(model: nn.Module, value: float = 0.7) -> list[str]:
    """Fill every all-zero gain-like parameter with ``value``; return their names."""
    owner = {}
    for mname, m in model.named_modules():
        for pname, _ in m.named_parameters(recurse=False):
            owner[f"{mname}.{pname}" if mname else pname] = (m, pname)
    revived = []
    for name, p in model.named_parameters():
        if p.numel() == 0 or bool(p.ne(0).any()):
            continue
        m, pname = owner[name]
        gain_like = any(w in pname.lower() for w in GAIN_WORDS)
        norm_weight = isinstance(m, NORMS) and pname == "weight"
        layer_weight = isinstance(m, PLAIN) and pname == "weight"  # zero-init fc / last conv
        if gain_like or norm_weight or layer_weight:
            p.fill_(value)
            revived.append(name)
    return revived


def overrides(cls: type) -> str:
    """Which of forward/_conv_forward a Linear/Conv subclass overrides."""
    if cls in PLAIN:
        return "plain"
    base = next((b for b in PLAIN if issubclass(cls, b)), None)
    if base is None:
        return "not a Linear/Conv"
    over = [
        f
        for f in ("forward", "_conv_forward")
        if f in vars(cls) or any(f in vars(k) for k in cls.__mro__[1 : cls.__mro__.index(base)])
    ]
    return f"subclass of nn.{base.__name__}, overrides {'/'.join(over) or 'nothing'}"


def _library_check(model: nn.Module, x: torch.Tensor) -> tuple[str, int | str]:
    """detect_topology with its self-check: "N ch" (chains kept) or "FAILS"; and len(Topology.untested)."""
    try:
        t = detect_topology(model, x, allow_empty=True, self_check=True)
    except TopologyError as e:
        return ("FAILS" if "self-check" in str(e) else f"error: {e}"), "-"
    return f"{len(t.chains)} ch", len(getattr(t, "untested", ())) if hasattr(t, "untested") else "n/a"


def probe(name: str) -> dict:
    t0 = time.perf_counter()
    model = build(name)
    t_build = time.perf_counter() - t0
    x_small = torch.randn(1, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    topo = detect_topology(model, x_small, allow_empty=True, self_check=False)
    t_detect = time.perf_counter() - t0

    classes = Counter()
    for ch in topo.chains:
        for layer in ch.layers:
            classes[type(model.get_submodule(layer.name))] += 1

    x = 10 * torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    t0 = time.perf_counter()
    with torch.no_grad():
        ref0 = model(x)
        det = rel_change(ref0, model(x))
    init_err = rescaled_change(model, topo, x, ref0) if topo.chains else 0.0
    # would the library's own self-check have caught it at init? (it uses the small input)
    selfcheck, untested = _library_check(model, x_small)

    revived = revive_gains(model)
    with torch.no_grad():
        ref = model(x)
    live_err = rescaled_change(model, topo, x, ref) if topo.chains else 0.0
    selfcheck_live, _ = _library_check(model, x_small)
    bad = []
    for ci, ch in enumerate(topo.chains):
        e = rescaled_change(model, topo, x, ref, only_chain=ci)
        if e > TOL:
            first = None
            for li in range(len(ch.layers) - 1):
                el = rescaled_change(model, topo, x, ref, only_chain=ci, only_layer=li)
                if el > TOL:
                    a, b = ch.layers[li], ch.layers[li + 1]
                    first = (
                        a.name,
                        type(model.get_submodule(a.name)).__name__,
                        b.name,
                        type(model.get_submodule(b.name)).__name__,
                        el,
                    )
                    break
            bad.append((ci, ch.name, len(ch.layers), e, first))
    t_measure = time.perf_counter() - t0
    return dict(
        name=name,
        n_params=sum(p.numel() for p in model.parameters()),
        chains=len(topo.chains),
        coverage=topo.coverage,
        classes=classes,
        init_err=init_err,
        live_err=live_err,
        det=det,
        selfcheck=selfcheck,
        selfcheck_live=selfcheck_live,
        untested=untested,
        revived=revived,
        bad=bad,
        method=topo.method,
        times=(t_build, t_detect, t_measure),
    )


def main(names: list[str]) -> None:
    rows = []
    for name in names:
        try:
            r = probe(name)
        except Exception as e:  # report and go on
            print(f"\n## {name}: FAILED {type(e).__name__}: {str(e)[:300]}")
            continue
        rows.append(r)
        tb, td, tm = r["times"]
        print(
            f"\n## {name}  ({r['n_params'] / 1e6:.1f}M params; build {tb:.1f}s, detect {td:.1f}s "
            f"[{r['method']}], measure {tm:.1f}s)"
        )
        print(
            f"chains {r['chains']}, coverage {100 * r['coverage']:.1f}%, eval repeat dev {r['det']:.1e}, "
            f"library self-check at init: {r['selfcheck']}, gains live: {r['selfcheck_live']}"
        )
        for cls, n in r["classes"].items():
            print(f"  claimed {n:3d} x {cls.__module__}.{cls.__name__}  ({overrides(cls)})")
        shown = ", ".join(r["revived"][:6]) + (f", ... ({len(r['revived'])} in all)" if len(r["revived"]) > 6 else "")
        print(f"  revived zero gains -> 0.7: {shown or 'none'}")
        print(f"  rel. output change, all chains rescaled: init {r['init_err']:.2e}, gains live {r['live_err']:.2e}")
        print(f"  bad chains (alone > {TOL:g}): {len(r['bad'])} of {r['chains']}")
        for ci, cname, nl, e, first in r["bad"][:12]:
            link = (
                f"first bad link {first[0]} ({first[1]}) -> {first[2]} ({first[3]}) {first[4]:.1e}"
                if first
                else "no single layer"
            )
            print(f"    chain {ci} {cname} [{nl} layers] {e:.2e}; {link}")
        if len(r["bad"]) > 12:
            print(f"    ... {len(r['bad']) - 12} more")

    print(
        "\n| model | chains | coverage | claimed module classes | library self-check: init / live | untested at init "
        "| max rel. change, init | max rel. change, gains live | bad chains |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cls = ", ".join(f"{c.__name__} x{n}" for c, n in r["classes"].items()) or "-"
        print(
            f"| {r['name']} | {r['chains']} | {100 * r['coverage']:.1f}% | {cls} | "
            f"{r['selfcheck']} / {r['selfcheck_live']} | {r['untested']} | "
            f"{r['init_err']:.1e} | {r['live_err']:.1e} | {len(r['bad'])} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:] or MODELS + SYNTHETIC)
