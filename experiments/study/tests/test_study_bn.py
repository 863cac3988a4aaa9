"""The BatchNorm parts of the study harness (issue 19): the ResNet-18, the BN methods and experiments,
and the S1+S2 rescaled starts. Tiny budgets only; the exact-mode cases skip where the package's
``detect_topology`` has no ``bn_mode="exact"``."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from experiments.study import experiments as ex
from experiments.study.data import digits_splits
from experiments.study.harness import RunConfig, _callbacks, initial_model, kw, run_one
from experiments.study.methods import METHODS, bn_mode_of
from experiments.study.models import ResNet18, build_model
from lightning_gsgd import detect_topology
from lightning_gsgd.topology.skeleton import rescale_normalized_rows_


def _has_exact() -> bool:
    try:
        detect_topology(torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.randn(1, 2), bn_mode="exact")
    except ValueError as e:
        return "bn_mode" not in str(e)
    return True


needs_exact = pytest.mark.skipif(not _has_exact(), reason="detect_topology has no bn_mode='exact' here")


def test_resnet18_has_torchvisions_structure_at_reduced_width():
    # 11,172,810 = torchvision 0.28's resnet18(num_classes=10) with a 3x3 stride-1 one-channel stem and no
    # max-pool (experiments/study/check_resnet18.py, results/study/mnist-resnet18/torchvision_check.txt)
    assert sum(p.numel() for p in ResNet18(784, 10, width=64).parameters()) == 11_172_810
    model = build_model("resnet18", 784, 10, width=4)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 20 and convs[0].kernel_size == (3, 3) and convs[0].stride == (1, 1)
    assert [m.out_channels for m in convs[-3:]] == [32, 32, 32]  # widths w, 2w, 4w, 8w
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 20
    assert model(torch.randn(2, 784)).shape == (2, 10)
    with pytest.raises(ValueError, match="square"):
        ResNet18(40, 10)


def test_bn_methods_and_experiments_are_defined_as_documented():
    assert METHODS["gsgd-exact"].bn_mode == "exact" and METHODS["gsgd-heuristic"].bn_mode == "authors_heuristic"
    assert all(METHODS[m].trained_with == "GSGD" for m in ("gsgd-exact", "gsgd-heuristic"))
    assert bn_mode_of(METHODS["sgd+skeleton"], {"bn_mode": "exact"}) == "exact"
    assert bn_mode_of(METHODS["gsgd-heuristic"], {"bn_mode": "exact"}) == "authors_heuristic"
    assert bn_mode_of(METHODS["gsgd"], {}) == "sgd"
    exps = ex.experiments(epoch_scale=0.5)
    bn, inv, r18 = exps["bn-exact"], exps["bn-invariance"], exps["mnist-resnet18"]
    assert bn.methods == r18.methods == ("sgd", "gsgd-heuristic", "gsgd-exact", "sgd+skeleton")
    assert inv.methods == ("sgd", "gsgd-heuristic", "gsgd-exact") and inv.reuse == ("bn-exact",)
    assert inv.spreads == (0.0, 1e-6, 1.0, 3.0) and inv.settings == bn.settings
    assert all(e.gsgd_kwargs == {"bn_mode": "exact"} for e in (bn, inv, r18))
    assert bn.settings[0].base.epochs == 20 and bn.settings[0].base.weight_decay == 5e-4
    assert r18.settings[0].base.dataset == "mnist" and dict(r18.settings[0].base.model_kwargs) == {"width": 8}
    assert r18.settings[0].base.epochs == 5
    cfg = RunConfig(method="gsgd-heuristic", lr=0.1, gsgd_kwargs=kw(bn_mode="exact"))
    (cb,) = _callbacks(cfg, METHODS["gsgd-heuristic"])
    assert cb.detect_options["bn_mode"] == "authors_heuristic" and not cb.skeleton_init
    (cb,) = _callbacks(dataclasses.replace(cfg, method="gsgd", gsgd_kwargs=()), METHODS["gsgd"])
    assert cb.detect_options["bn_mode"] == "sgd"  # the MLP/CNN runs: as before, whatever the package default


def test_no_s2_layers_no_draws_so_earlier_rescaled_runs_are_unchanged():
    model = build_model("mlp2", 8, 3, width=4)
    topo = detect_topology(model, torch.randn(2, 8))
    gen = torch.Generator().manual_seed(3)
    before = [p.clone() for p in model.parameters()]
    rescale_normalized_rows_(topo, 1.0, gen)
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(3).get_state())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_heuristic_bn_resnet_trains_through_lightning_on_a_tiny_budget():
    cfg = RunConfig(
        method="gsgd-heuristic",
        lr=0.01,
        dataset="digits",
        model="bn_resnet",
        model_kwargs=kw(channels=4),
        weight_decay=5e-4,
        epochs=1,
        limit_train_batches=2,
        gsgd_kwargs=kw(bn_mode="authors_heuristic"),
    )
    r = run_one(cfg, accelerator="cpu")
    assert r["optimizer"] == "GSGD" and r["steps"] == 2 and not r["diverged"]


@needs_exact
def test_s1_s2_rescaled_start_is_the_same_function_and_the_same_for_every_method():
    splits = digits_splits()
    cfg = RunConfig(
        method="sgd",
        lr=0.01,
        dataset="digits",
        model="bn_resnet",
        model_kwargs=kw(channels=4),
        rescale_spread=1.0,
        gsgd_kwargs=kw(bn_mode="exact"),
    )
    plain, _ = initial_model(dataclasses.replace(cfg, rescale_spread=0.0), splits)
    scaled, _ = initial_model(cfg, splits)
    heur, _ = initial_model(dataclasses.replace(cfg, method="gsgd-heuristic"), splits)
    exact, topo = initial_model(dataclasses.replace(cfg, method="gsgd-exact"), splits)
    exact0, _ = initial_model(dataclasses.replace(cfg, method="gsgd-exact", rescale_spread=0.0), splits)
    skel, _ = initial_model(dataclasses.replace(cfg, method="sgd+skeleton"), splits)
    assert topo is not None and (topo.normalized or any(c.normalized for c in topo.chains))
    assert not all(torch.equal(a, b) for a, b in zip(plain.parameters(), scaled.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(scaled.parameters(), heur.parameters()))  # no chains there
    assert all(torch.equal(a, b) for a, b in zip(exact.parameters(), skel.parameters()))
    x = splits.x_train[:16].double()
    for a, b in ((plain, scaled), (exact0, exact)):
        a.double().train(), b.double().train()
        assert not torch.allclose(a(x), b(x), rtol=1e-9, atol=1e-9)  # BatchNorm's eps: S2 is not exact
        for bn in (m for model in (a, b) for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)):
            bn.eps = 1e-30
        assert torch.allclose(a(x), b(x), rtol=1e-6, atol=1e-6)  # without eps, S1 and S2 change nothing
