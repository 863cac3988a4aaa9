"""The accelerator path of ``GSGD.step`` never reads a tensor value on the host.

On an accelerator, reading a flag (``.item()``, ``bool(t)``, ``torch.equal``...) stalls the host
until the device catches up and breaks CUDA graph capture. ``GSGD`` therefore takes a
synchronization-free path there: it never branches on tensor values, and applies a step that must
be skipped with ``torch.where``. The optimizer's documented test hook ``host_reads = False`` selects that path
on the CPU, where these tests run it with every host read patched to raise. They also check that
the path computes what the CPU path computes, bit for bit, and skips non-finite steps the same way.
(On a GPU, ``benchmarks/gpu_check.py`` runs the step under ``torch.cuda.set_sync_debug_mode``.)
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch._dynamo

from lightning_gsgd import GSGD, detect_topology, init_skeleton_, random_unit_factors, rescale_hidden_units_
from tests.models import make


def _raise(*args, **kwargs):
    raise AssertionError("step() read a tensor value on the host")


@contextmanager
def no_host_reads() -> Iterator[None]:
    """Every way to read a tensor's value from Python raises inside the block."""
    mp = pytest.MonkeyPatch()
    try:
        for name in ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
            mp.setattr(torch.Tensor, name, _raise)
        for name in ("equal", "nonzero", "is_nonzero"):
            mp.setattr(torch, name, _raise)
        yield
    finally:
        mp.undo()


def test_the_patch_catches_host_reads():
    t = torch.ones(2)
    reads = (lambda: t.sum().item(), lambda: bool(t.all()), lambda: float(t[0]), lambda: torch.equal(t, t))
    for read in reads:
        with no_host_reads(), pytest.raises(AssertionError, match="read a tensor value"):
            read()
        read()  # and the patch is gone after the block


def _setup(name: str, init: str):
    model, x = make(name)
    topo = detect_topology(model, x)
    init_skeleton_(topo)
    if init == "rescaled":  # B != 1: the general (outer-product) form of the step
        rescale_hidden_units_(topo, random_unit_factors(topo, 1.0, torch.Generator().manual_seed(3)))
    y = torch.randn(x.shape[0], model(x).shape[1], dtype=x.dtype, generator=torch.Generator().manual_seed(1))
    return model, x, y


def _grads(model, x, y, *, poison: bool = False) -> list[torch.Tensor]:
    model.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    if poison:
        with torch.no_grad():
            next(model.parameters()).grad.view(-1)[0] = float("nan")
    return [p.grad.clone() for p in model.parameters()]


def _copy_grads(model, grads) -> None:
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()


HYPERS = [
    dict(lr=1e-3),
    dict(lr=1e-3, momentum=0.9, weight_decay=0.01),
    dict(lr=1e-3, momentum=0.5, dampening=0.3, weight_decay=0.001),
    dict(lr=1e-3, momentum=0.9, nesterov=True),
    dict(lr=5.0, momentum=0.9),  # the guard acts
]


@pytest.mark.parametrize("hyper", HYPERS, ids=["plain", "momentum_wd", "dampening", "nesterov", "guarded"])
@pytest.mark.parametrize("init", ["skeleton", "rescaled"])
@pytest.mark.parametrize("name", ["mlp_unequal", "cnn", "mixed"])
def test_sync_free_path_matches_the_cpu_path(name, init, hyper):
    _compare_paths(name, init, hyper, compiled=False)


# Inductor compiles each case (3-5 s): three in the default run, the rest marked slow (CI runs them).
_NOSYNC_DEFAULT = {
    ("mlp_unequal", "rescaled", "guarded"),
    ("cnn", "skeleton", "momentum_wd"),
    ("cnn", "rescaled", "plain"),
}


@pytest.mark.parametrize(
    "name,init,hyper",
    [
        pytest.param(n, i, h, id=f"{n}-{i}-{k}", marks=() if (n, i, k) in _NOSYNC_DEFAULT else pytest.mark.slow)
        for n in ("mlp_unequal", "cnn")
        for i in ("skeleton", "rescaled")
        for k, h in zip(("plain", "momentum_wd", "nesterov", "guarded"), (HYPERS[0], HYPERS[1], HYPERS[3], HYPERS[4]))
    ],
)
def test_sync_free_path_with_compiled_kernels_matches_the_cpu_path(name, init, hyper):
    torch._dynamo.reset()
    _compare_paths(name, init, hyper, compiled=True)
    torch._dynamo.reset()


def _compare_paths(name: str, init: str, hyper: dict, compiled: bool) -> None:
    model, x, y = _setup(name, init)
    cpu_model = copy.deepcopy(model)
    dev_model = copy.deepcopy(model)
    cpu = GSGD(cpu_model.parameters(), topology=detect_topology(cpu_model, x), compiled=compiled, **hyper)
    dev = GSGD(dev_model.parameters(), topology=detect_topology(dev_model, x), compiled=compiled, **hyper)
    dev.host_reads = False
    for k in range(4):
        _copy_grads(dev_model, _grads(cpu_model, x, y))
        cpu.step()
        if compiled and k == 0:
            dev.step()  # compiling reads values (Dynamo looks at 0-d inputs); the compiled steps must not
            continue
        with no_host_reads():
            dev.step()
    moved = any(not torch.equal(p, q) for p, q in zip(cpu_model.parameters(), model.parameters()))
    assert moved, "the steps did nothing: the comparison would be vacuous"
    for (n, p), q in zip(cpu_model.named_parameters(), dev_model.parameters()):
        assert torch.equal(p, q), n
        b1, b2 = cpu.state[p].get("momentum_buffer"), dev.state[q].get("momentum_buffer")
        assert (b1 is None) == (b2 is None), n
        if b1 is not None:
            assert torch.equal(b1, b2), n
    for counter in ("steps", "skipped_steps", "guard_hits"):
        assert int(getattr(cpu, counter)) == int(getattr(dev, counter)), counter
    if hyper["lr"] > 1:
        assert int(dev.guard_hits) > 0, "the guard never acted: that case proves nothing"


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])  # compiled: ~15 s
def test_tensor_lr_and_per_layer_groups_take_no_host_reads(compiled):
    torch._dynamo.reset()
    model, x, y = _setup("mlp_unequal", "rescaled")
    layers = [m for m in model if isinstance(m, torch.nn.Linear)]
    groups = [
        dict(
            params=list(m.parameters()), lr=torch.tensor(1e-3 * (i + 1), dtype=x.dtype), momentum=0.9 if i % 2 else 0.0
        )
        for i, m in enumerate(layers)
    ]
    opt = GSGD(groups, lr=1e-3, topology=detect_topology(model, x), compiled=compiled)
    opt.host_reads = False
    before = copy.deepcopy(model)
    for k in range(3):
        _grads(model, x, y)
        if compiled and k == 0:
            opt.step()  # compiling reads values (Dynamo looks at 0-d inputs); the compiled steps must not
            continue
        with no_host_reads():
            opt.step()
    assert int(opt.steps) == 3
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before.parameters()))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sync_free_path_skips_a_non_finite_step(momentum):
    model, x, y = _setup("cnn", "skeleton")
    opt = GSGD(model.parameters(), lr=1e-3, momentum=momentum, topology=detect_topology(model, x))
    opt.host_reads = False
    _grads(model, x, y)
    with no_host_reads():
        opt.step()  # a good step first, so that momentum buffers exist
    weights = [p.detach().clone() for p in model.parameters()]
    bufs = [opt.state[p].get("momentum_buffer") for p in model.parameters()]
    bufs = [None if b is None else b.clone() for b in bufs]
    _grads(model, x, y, poison=True)
    with no_host_reads():
        opt.step()
    assert (int(opt.steps), int(opt.skipped_steps)) == (1, 1)
    for p, w, b in zip(model.parameters(), weights, bufs):
        assert torch.equal(p, w)
        nb = opt.state[p].get("momentum_buffer")
        assert (nb is None) == (b is None)
        if b is not None:
            assert torch.equal(nb, b)
    _grads(model, x, y)
    with no_host_reads():
        opt.step()
    assert (int(opt.steps), int(opt.skipped_steps)) == (2, 1)
