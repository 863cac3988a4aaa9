"""A step that would drive a free tau path value to (or past) the floor is skipped, never written.

Bug report: on sklearn digits, MLP 64-64-64-64-10 after ``init_skeleton_``, GSGD lr=1 momentum=0.9,
the guard clamped the same tau path value by ``min_ratio`` step after step until it underflowed;
mapping back divided by it and wrote inf weights, and every later step was skipped. Now the step
checks its O(H) per-row factors (``F'``, ``1 / rho`` ...) before writing anything: such a step is
skipped (weights and momentum untouched, counted in ``skipped_steps``), on the CPU path and on the
synchronization-free accelerator path alike.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_gsgd import GSGD, detect_topology, init_skeleton_
from tests.test_step_nosync import no_host_reads


def _model(x: torch.Tensor) -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(3):
        layers += [nn.Linear(64, 64), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(64, 10))
    topo = detect_topology(model, x[:2])
    init_skeleton_(topo)
    return model, topo


@pytest.mark.parametrize("host_reads", [None, False], ids=["cpu_path", "sync_free_path"])
def test_collapse_is_skipped_not_written(digits, host_reads):
    x, y = digits
    model, topo = _model(x)
    opt = GSGD(model.parameters(), lr=1.0, momentum=0.9, topology=topo)
    opt.host_reads = host_reads
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        idx = torch.randint(0, len(x), (64,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        before = [p.detach().clone() for p in model.parameters()]
        bufs = [opt.state[p]["momentum_buffer"].clone() if p in opt.state else None for p in model.parameters()]
        skipped = int(opt.skipped_steps)
        if host_reads is False:
            with no_host_reads():
                opt.step()
        else:
            opt.step()
        for n, p in model.named_parameters():
            assert torch.isfinite(p).all(), f"{n}: the step wrote a non-finite weight"
        if int(opt.skipped_steps) > skipped:
            for p, b, m in zip(model.parameters(), before, bufs):
                assert torch.equal(p, b), "a skipped step changed a weight"
                if m is not None:
                    assert torch.equal(opt.state[p]["momentum_buffer"], m), "a skipped step changed a buffer"
    assert int(opt.guard_hits) > 0, "the guard never acted: the run does not reproduce the report"
    assert int(opt.skipped_steps) > 0, "no step was skipped: the collapse was not reached"
    assert int(opt.steps) + int(opt.skipped_steps) == 30


def test_both_paths_agree_through_the_collapse(digits):
    x, y = digits
    model, topo = _model(x)
    other = copy.deepcopy(model)
    cpu = GSGD(model.parameters(), lr=1.0, momentum=0.9, topology=topo)
    dev = GSGD(other.parameters(), lr=1.0, momentum=0.9, topology=detect_topology(other, x[:2]))
    dev.host_reads = False
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        idx = torch.randint(0, len(x), (64,), generator=g)
        for m, o in ((model, cpu), (other, dev)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x[idx]), y[idx]).backward()
        cpu.step()
        with no_host_reads():
            dev.step()
    assert int(cpu.skipped_steps) > 0
    for c in ("steps", "skipped_steps", "guard_hits"):
        assert int(getattr(cpu, c)) == int(getattr(dev, c)), c
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)
