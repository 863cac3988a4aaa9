"""Diagnostics against independent computations: the brute-force oracle and plain per-unit loops."""

from __future__ import annotations

import ast
import copy
import math
import statistics
from pathlib import Path

import pytest
import torch

from lightning_gsgd import GSGD, detect_topology, init_skeleton_
from lightning_gsgd.diagnostics import chain as path_metrics
from lightning_gsgd.diagnostics import metrics as diagnostics
from lightning_gsgd.diagnostics.metrics import (
    AFTER_KEYS,
    BEFORE_KEYS,
    PER_CHAIN_KEYS,
    SUMMARY_KEYS,
    PathDiagnostics,
    topology_summary,
)
from lightning_gsgd.topology import selfcheck
from lightning_gsgd.topology.skeleton import random_unit_factors, rescale_hidden_units_
from tests.models import MODELS, initialize, make, two_chains
from tests.oracle import PathParameterization, path_values, sigma_mask

RTOL = 1e-10


def _model(name: str, seed: int = 0):
    if name == "two_chains":
        torch.manual_seed(seed)
        return two_chains().double(), torch.randn(6, 4, dtype=torch.float64)
    return make(name, seed)


ALL = list(MODELS) + ["two_chains"]


def _loss(model, x):
    with torch.no_grad():
        n_out = model(x).shape[1]
    y = torch.randn(x.shape[0], n_out, dtype=x.dtype, generator=torch.Generator().manual_seed(1))
    return lambda out: ((out - y) ** 2).mean()


def _oracle_chain(chain):
    """Per chain: squared norm of v over basis paths, and |v| of the skeleton paths (plain loops)."""
    vw, vb = path_values(chain)
    v2 = 0.0
    skel = []
    last = len(chain.layers) - 1
    for l, layer in enumerate(chain.layers):
        free = ~sigma_mask(chain, l)
        v2 += float((vw[l][free] ** 2).sum())
        if vb[l] is not None and l < last:
            v2 += float((vb[l] ** 2).sum())
        if l > 0:
            for a in range(layer.n_in):
                r = a % layer.n_out
                if free[r, a, layer.centre]:
                    skel.append(abs(float(vw[l][r, a, layer.centre])))
    return v2, skel


def _oracle_grad_sq(model, topo, x, loss_fn) -> list[float]:
    """||dL/dv||^2 per chain, by autograd on the path-value parameterization."""
    pp = PathParameterization(model, topo)
    loss_fn(pp.forward(x)).backward()
    out = []
    for chain, vw, vb, _, _ in pp.chain_leaves:
        total = 0.0
        for l, v in enumerate(vw):
            # sigma entries do not reach the weights: their gradient must be exactly zero
            assert torch.all(v.grad[sigma_mask(chain, l)] == 0)
            total += float((v.grad**2).sum())
        total += sum(float((b.grad**2).sum()) for b in vb if b is not None)
        out.append(total)
    return out


def _stats_ref(g2: float, v2: float, skel: list[float]) -> dict[str, float]:
    s = sorted(skel)
    return {
        "path_grad_norm": math.sqrt(g2),
        "basis_path_norm": math.sqrt(v2),
        "skeleton_abs_min": s[0],
        "skeleton_abs_median": s[(len(s) - 1) // 2],
        "skeleton_abs_max": s[-1],
    }


def _direct_imbalance_terms(chain) -> list[float]:
    """log(||in|| / ||out||) per hidden unit, read from the layers' own weight shapes."""
    terms = []
    for layer, nxt in zip(chain.layers[:-1], chain.layers[1:]):
        w, wn = layer.weight.detach(), nxt.weight.detach()
        for j in range(layer.n_out):
            inc = float((w[j] ** 2).sum()) + (0.0 if layer.bias is None else float(layer.bias.detach()[j]) ** 2)
            if wn.dim() == 2 and wn.shape[1] != layer.n_out:  # Linear after Flatten: a block of columns
                s = wn.shape[1] // layer.n_out
                col = wn[:, j * s : (j + 1) * s]
            else:
                col = wn[:, j]
            terms.append(0.5 * math.log(inc / float((col**2).sum())))
    return terms


@pytest.mark.parametrize("init", ["skeleton_rescaled", "order_one"])
@pytest.mark.parametrize("name", ALL)
def test_before_step_matches_oracle(name, init):
    model, x = _model(name)
    topo = detect_topology(model, x)
    initialize(model, topo, init)
    loss_fn = _loss(model, x)
    g2 = _oracle_grad_sq(model, topo, x, loss_fn)

    model.zero_grad()
    loss_fn(model(x)).backward()
    diag = PathDiagnostics(topo, per_chain=True)
    got = diag.before_step()

    per = [_oracle_chain(c) for c in topo.chains]
    for ci, ((v2, skel), gg) in enumerate(zip(per, g2)):
        ref = _stats_ref(gg, v2, skel)
        ref["imbalance"] = statistics.pstdev(_direct_imbalance_terms(topo.chains[ci]))
        for k, r in ref.items():
            assert float(got[f"chain{ci}/{k}"]) == pytest.approx(r, rel=RTOL), (ci, k)
    ref = _stats_ref(sum(g2), sum(v for v, _ in per), [s for _, sk in per for s in sk])
    ref["imbalance"] = statistics.pstdev([t for c in topo.chains for t in _direct_imbalance_terms(c)])
    for k, r in ref.items():
        assert float(got[k]) == pytest.approx(r, rel=RTOL), k
    assert ref["path_grad_norm"] > 0 and ref["imbalance"] > 0  # not a vacuous comparison


def test_keys_shapes_and_device():
    model, x = _model("two_chains")
    topo = detect_topology(model, x)
    opt = GSGD(model.parameters(), lr=1e-3, topology=topo)
    loss_fn = _loss(model, x)
    loss_fn(model(x)).backward()
    diag = PathDiagnostics(topo)
    before = diag.before_step()
    opt.step()
    after = diag.after_step(opt)
    assert tuple(before) == BEFORE_KEYS
    assert tuple(after) == AFTER_KEYS
    for v in {**before, **after}.values():
        assert isinstance(v, torch.Tensor) and v.dim() == 0 and v.is_floating_point()
        assert v.device == model[0].weight.device and torch.isfinite(v)
    diag = PathDiagnostics(topo, per_chain=True)
    keys = set(diag.before_step()) | set(diag.after_step(opt))
    assert {f"chain{i}/{k}" for i in range(2) for k in PER_CHAIN_KEYS} <= keys


def test_rescaling_changes_imbalance_only():
    model, x = _model("cnn")
    topo = detect_topology(model, x)
    initialize(model, topo, "skeleton_rescaled")
    loss_fn = _loss(model, x)
    scaled = copy.deepcopy(model)
    stopo = detect_topology(scaled, x)
    rescale_hidden_units_(stopo, random_unit_factors(stopo, 1.5, torch.Generator().manual_seed(7)))
    assert torch.allclose(scaled(x), model(x), rtol=1e-12)

    results = []
    for m, t in ((model, topo), (scaled, stopo)):
        opt = GSGD(m.parameters(), lr=1e-2, momentum=0.9, topology=t)
        diag = PathDiagnostics(t)
        opt.zero_grad()
        loss_fn(m(x)).backward()
        before = diag.before_step()
        opt.step()
        results.append({**before, **diag.after_step(opt)})
    a, b = results
    for k in BEFORE_KEYS + ("relative_update",):
        if k != "imbalance":
            assert float(a[k]) == pytest.approx(float(b[k]), rel=1e-9), k
    assert float(a["relative_update"]) > 1e-4
    assert abs(float(a["imbalance"]) - float(b["imbalance"])) > 0.1


@pytest.mark.parametrize("optim", ["gsgd", "sgd"])
@pytest.mark.parametrize("name", ["mlp_unequal", "cnn", "two_chains"])
def test_relative_update_matches_oracle(name, optim):
    model, x = _model(name)
    topo = detect_topology(model, x)
    initialize(model, topo, "skeleton_rescaled")
    loss_fn = _loss(model, x)

    def flat():
        parts = []
        for chain in topo.chains:
            vw, vb = path_values(chain)
            last = len(chain.layers) - 1
            parts += [vw[l][~sigma_mask(chain, l)] for l in range(len(vw))]
            parts += [b for l, b in enumerate(vb) if b is not None and l < last]
        return torch.cat(parts)

    v0 = flat()
    # plain SGD also moves the sigma weights, so the B products change across the step
    if optim == "gsgd":
        opt = GSGD(model.parameters(), lr=1e-2, topology=topo)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    diag = PathDiagnostics(topo)
    loss_fn(model(x)).backward()
    diag.before_step()
    opt.step()
    got = diag.after_step(opt)["relative_update"]
    v1 = flat()
    ref = float((v1 - v0).norm() / v0.norm())
    assert ref > 1e-4
    assert float(got) == pytest.approx(ref, rel=RTOL)

    # lr = 0 moves the path values by rounding only (the map back to weights divides and multiplies)
    opt.param_groups[0]["lr"] = 0.0
    diag.before_step()
    opt.step()
    assert float(diag.after_step(opt)["relative_update"]) < 1e-15


def test_guard_hits_follow_optimizer_counter():
    model, x = _model("mlp_equal")
    topo = detect_topology(model, x)
    init_skeleton_(topo)
    loss_fn = _loss(model, x)
    opt = GSGD(model.parameters(), lr=1e3, topology=topo)
    diag = PathDiagnostics(topo)
    for _ in range(2):
        opt.zero_grad()
        loss_fn(model(x)).backward()
        diag.before_step()
        opt.step()
        got = diag.after_step(opt)
        assert float(got["guard_hits"]) == float(opt.guard_hits)
    assert float(got["guard_hits"]) > 0
    assert float(got["skipped_steps"]) == 0
    assert float(got["steps"]) == 2


def test_nan_gradient_counts_a_skipped_step_and_no_update():
    model, x = _model("cnn")
    topo = detect_topology(model, x)
    init_skeleton_(topo)
    loss_fn = _loss(model, x)
    opt = GSGD(model.parameters(), lr=1e-2, topology=topo)
    diag = PathDiagnostics(topo)
    loss_fn(model(x)).backward()
    model[0].weight.grad[0, 0, 0, 0] = float("nan")
    before = diag.before_step()
    opt.step()
    after = diag.after_step(opt)
    assert torch.isnan(before["path_grad_norm"])
    assert float(after["skipped_steps"]) == 1
    assert float(after["steps"]) == 0
    assert float(after["relative_update"]) == 0.0
    assert float(after["guard_hits"]) == 0


def test_plain_optimizer_gives_no_counters_and_missing_grads_count_as_zero():
    model, x = _model("mlp_equal")
    topo = detect_topology(model, x)
    diag = PathDiagnostics(topo)
    before = diag.before_step()  # no backward yet: every grad is None
    assert float(before["path_grad_norm"]) == 0.0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _loss(model, x)(model(x)).backward()
    opt.step()
    after = diag.after_step(opt)
    assert set(after) == {"relative_update"}
    assert float(after["relative_update"]) > 0


def test_after_step_needs_before_step():
    model, x = _model("mlp_equal")
    diag = PathDiagnostics(detect_topology(model, x))
    with pytest.raises(RuntimeError, match="before_step"):
        diag.after_step()
    diag.before_step()
    diag.after_step()
    with pytest.raises(RuntimeError, match="before_step"):
        diag.after_step()


def test_half_precision_weights_give_float32_values():
    model, x = _model("mlp_equal")
    model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)
    topo = detect_topology(model, x)
    init_skeleton_(topo)
    _loss(model, x)(model(x)).float().backward()
    got = PathDiagnostics(topo).before_step()
    for k, v in got.items():
        assert v.dtype == torch.float32 and torch.isfinite(v), k


def test_summary_equals_topology_counts():
    model, x = _model("two_chains")
    topo = detect_topology(model, x)
    s = topology_summary(topo)
    assert tuple(s) == SUMMARY_KEYS
    # independent count: chains 4-6-5 and 5-7-3 with biases; LayerNorm(5) outside
    hidden = 6 + 7
    weights_and_hidden_bias = (4 * 6 + 6 * 5 + 6) + (5 * 7 + 7 * 3 + 7)
    covered = (4 * 6 + 6 + 6 * 5 + 5) + (5 * 7 + 7 + 7 * 3 + 3)
    assert s == {
        "chains": 2.0,
        "hidden_units": float(hidden),
        "basis_paths": float(weights_and_hidden_bias - hidden),
        "coverage": covered / (covered + 10),
        "covered_params": float(covered),
        "plain_params": 10.0,
        "s1_units": 0.0,
        "s2_rows": 0.0,
    }
    assert s["plain_params"] == sum(e.numel for e in topo.excluded)
    assert PathDiagnostics(topo).summary() == s
    assert f"{int(s['basis_paths'])} basis paths" in topo.summary()


@pytest.mark.parametrize("module", [diagnostics, path_metrics, selfcheck])
def test_diagnostics_modules_import_no_lightning(module):
    tree = ast.parse(Path(module.__file__).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            roots.add(node.module.split(".")[0])
    assert not roots & {"lightning", "pytorch_lightning"}
