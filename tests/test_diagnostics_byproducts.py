"""``PathDiagnostics`` with the optimizer's by-products equals its own independent computation.

Given the optimizer in ``before_step(optimizer)``, a bound ``GSGD`` produces the metrics during its
step (lightning_gsgd/step/readings.py); every value must equal what ``before_step()`` /
``after_step()`` compute on an identical copy without it (the path the oracle tests pin), on the
CPU path and the synchronization-free path, with B = 1 and B != 1, with and without momentum, and
when the guard acts or the step is skipped.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_gsgd import GSGD, detect_topology
from lightning_gsgd.diagnostics.metrics import AFTER_KEYS, BEFORE_KEYS, PER_CHAIN_KEYS, PathDiagnostics
from tests.models import initialize
from tests.test_diagnostics import _loss, _model
from tests.test_step_nosync import no_host_reads

HYPERS = {
    "momentum": dict(lr=1e-2, momentum=0.9),
    "momentum_wd_damp": dict(lr=1e-2, momentum=0.5, dampening=0.3, weight_decay=0.05),
    "plain": dict(lr=1e-2),
    "plain_wd": dict(lr=1e-2, weight_decay=0.05),
    "guarded": dict(lr=5.0, momentum=0.9),
}


def _pair(name, init, hyper):
    model, x = _model(name)
    topo = detect_topology(model, x)
    if init == "skeleton":
        from lightning_gsgd import init_skeleton_

        init_skeleton_(topo)
    else:
        initialize(model, topo, "skeleton_rescaled")
    other = copy.deepcopy(model)
    topo2 = detect_topology(other, x)
    return (model, topo, GSGD(model.parameters(), topology=topo, **hyper)), (other, topo2, x)


@pytest.mark.parametrize("sync_free", [False, True], ids=["cpu_path", "sync_free_path"])
@pytest.mark.parametrize("hyper", list(HYPERS))
@pytest.mark.parametrize("init", ["skeleton", "rescaled"])
@pytest.mark.parametrize("name", ["mlp_unequal", "cnn", "two_chains"])
def test_byproducts_equal_the_independent_computation(name, init, hyper, sync_free):
    _check_byproducts(name, init, hyper, sync_free, compiled=False)


@pytest.mark.parametrize("hyper", ["momentum_wd_damp", "plain_wd"])
@pytest.mark.parametrize("init", ["skeleton", "rescaled"])
@pytest.mark.parametrize("name", ["mlp_unequal", "cnn"])
def test_a_compiled_optimizer_takes_the_eager_step_when_readings_are_requested(name, init, hyper):
    # the compiled graph has no by-products: a logging step of GSGD(compiled=True) is the eager step,
    # so its readings and weights equal an eager optimizer's bit for bit, and the graph never runs
    _check_byproducts(name, init, hyper, sync_free=False, compiled=True)


def _check_byproducts(name: str, init: str, hyper: str, sync_free: bool, compiled: bool) -> None:
    (model, topo, opt), (other, topo2, x) = _pair(name, init, HYPERS[hyper])
    ref_opt = GSGD(other.parameters(), topology=topo2, **HYPERS[hyper])
    if compiled:
        opt.compiled = True
    if sync_free:
        opt.host_reads = False
    diag, ref = PathDiagnostics(topo, per_chain=True), PathDiagnostics(topo2, per_chain=True)
    loss_fn = _loss(model, x)
    for _ in range(3):
        for m, o in ((model, opt), (other, ref_opt)):
            o.zero_grad()
            loss_fn(m(x)).backward()
        assert diag.before_step(opt) == {}, "the by-products were not requested"
        if sync_free:
            with no_host_reads():
                opt.step()
        else:
            opt.step()
        got = diag.after_step(opt)
        want = ref.before_step()
        ref_opt.step()
        want.update(ref.after_step(ref_opt))
        assert set(got) == set(want) >= set(BEFORE_KEYS + AFTER_KEYS)
        assert any(k.startswith("chain0/") for k in got) and set(PER_CHAIN_KEYS) <= {k.split("/")[-1] for k in got}
        for k in want:
            assert float(got[k]) == pytest.approx(float(want[k]), rel=1e-9, abs=1e-14), k
        assert float(want["relative_update"]) > 1e-6, "the step did not move: the comparison is vacuous"
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q), "requesting the by-products changed the step"
    if hyper == "guarded":
        assert int(opt.guard_hits) > 0
    if compiled:
        assert opt._graphs is None, "the compiled graph ran on a step with readings"


def test_skipped_step_and_missing_step_fall_back():
    (model, topo, opt), (other, topo2, x) = _pair("mlp_unequal", "rescaled", HYPERS["momentum"])
    diag, ref = PathDiagnostics(topo), PathDiagnostics(topo2)
    loss_fn = _loss(model, x)
    for m in (model, other):
        loss_fn(m(x)).backward()
        next(m.parameters()).grad.view(-1)[0] = float("nan")
    # a skipped step: no update, non-finite gradient norm, like the independent computation
    diag.before_step(opt)
    opt.step()
    got = diag.after_step(opt)
    want = ref.before_step()
    want.update(ref.after_step(opt))
    assert int(opt.skipped_steps) == 1 and float(got["relative_update"]) == 0.0
    assert not torch.isfinite(got["path_grad_norm"]) and not torch.isfinite(want["path_grad_norm"])
    for k in ("basis_path_norm", "skeleton_abs_min", "skeleton_abs_median", "skeleton_abs_max", "imbalance"):
        assert float(got[k]) == pytest.approx(float(want[k]), rel=1e-9), k
    # the optimizer never called (AMP's GradScaler skipped it): measured at the unchanged weights
    for m in (model, other):
        m.zero_grad()
        loss_fn(m(x)).backward()
    diag.before_step(opt)
    got = diag.after_step(opt)
    want = ref.before_step()
    want.update(ref.after_step(opt))
    for k in want:
        assert float(got[k]) == pytest.approx(float(want[k]), rel=1e-12), k
    assert not opt._readings_request, "the request outlived the step it was for"


def test_nesterov_is_measured_by_the_diagnostics_themselves():
    (model, topo, opt), _ = _pair("mlp_unequal", "skeleton", dict(lr=1e-2, momentum=0.9, nesterov=True))
    diag = PathDiagnostics(topo)
    _loss(model, x := _model("mlp_unequal")[1])(model(x)).backward()
    assert set(diag.before_step(opt)) == set(BEFORE_KEYS), "nesterov has no by-products: measure before the step"
    opt.step()
    assert set(diag.after_step(opt)) == set(AFTER_KEYS)


@pytest.mark.parametrize("momenta", [(0.9, 0.5, 0.7), (0.0, 0.0, 0.0)], ids=["per_layer_momentum", "plain"])
def test_per_layer_groups_and_tensor_lr(momenta):
    """Per-layer lr (a tensor in one group) and momentum: the tau entries' lr is then a vector."""
    model, x = _model("mlp_unequal")
    topo = detect_topology(model, x)
    initialize(model, topo, "skeleton_rescaled")
    other = copy.deepcopy(model)
    topo2 = detect_topology(other, x)

    def groups(m):
        layers = [layer for layer in m if isinstance(layer, torch.nn.Linear)]
        out = []
        for i, layer in enumerate(layers):
            lr = torch.tensor(0.01, dtype=x.dtype) if (i == 1 and momenta[0]) else 0.01 * (1 + i * (momenta[0] > 0))
            out.append(dict(params=list(layer.parameters()), lr=lr, momentum=momenta[min(i, 2)]))
        return out

    opt, ref_opt = GSGD(groups(model), topology=topo), GSGD(groups(other), topology=topo2)
    diag, ref = PathDiagnostics(topo), PathDiagnostics(topo2)
    loss_fn = _loss(model, x)
    for _ in range(3):
        for m, o in ((model, opt), (other, ref_opt)):
            o.zero_grad()
            loss_fn(m(x)).backward()
        assert diag.before_step(opt) == {}
        opt.step()
        got = diag.after_step(opt)
        want = ref.before_step()
        ref_opt.step()
        want.update(ref.after_step(ref_opt))
        for k in want:
            assert float(got[k]) == pytest.approx(float(want[k]), rel=1e-9, abs=1e-14), k
        assert float(want["relative_update"]) > 1e-6
