"""torch's distributed optimizer state dicts (``get_optimizer_state_dict`` / ``set_optimizer_state_dict``,
what Lightning's ModelParallelStrategy saves and loads) leave the G-space optimizers' counters exact, and
GAdam accepts its own state from them (they drop the ``"gsgd"`` entry)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_gsgd import GSGD, GAdam, detect_topology
from lightning_gsgd.topology.types import TopologyError

dcp = pytest.importorskip("torch.distributed.checkpoint.state_dict")


def _trained(cls: type, **hp: object) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A small MLP after 4 steps of ``cls``: one skipped (a NaN gradient) and one whose guard clamps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    opt = cls(model.parameters(), topology=detect_topology(model, torch.randn(3, 4)), **hp)
    for k in range(4):
        opt.zero_grad()
        model(torch.randn(3, 4)).pow(2).sum().backward()
        if k == 1:
            model[2].weight.grad[0, 0] = float("nan")
        opt.step()
    opt.zero_grad(set_to_none=True)  # no gradients: torch's state init steps the optimizer
    return model, opt


@pytest.mark.parametrize(("cls", "hp"), [(GSGD, {"lr": 2.0}), (GAdam, {"lr": 0.5, "weight_decay": 0.1})])
def test_state_init_step_is_not_counted(cls, hp):
    """GSGD with momentum 0 holds no state, so ``get_optimizer_state_dict`` takes a zero-gradient ``lr=0``
    step first (torch's ``_init_optim_state``), and every load into a fresh optimizer does: neither
    changes a counter (``steps`` used to count it) nor a weight."""
    model, opt = _trained(cls, **hp)
    counters = {k: int(v) for k, v in opt.counters().items()}
    assert counters["steps"] == 3 and counters["skipped_steps"] == 1 and counters["guard_hits"] > 0, counters
    weights = [p.detach().clone() for p in model.parameters()]
    assert bool(opt.state) == (cls is GAdam)
    saved = dcp.get_optimizer_state_dict(model, opt)
    assert list(saved) == ["state", "param_groups"]  # the "gsgd" entry is dropped
    assert {k: int(v) for k, v in opt.counters().items()} == counters
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters()))

    fresh = cls(model.parameters(), topology=opt.topology, **hp)
    dcp.set_optimizer_state_dict(model, fresh, saved)
    assert {k: int(v) for k, v in fresh.counters().items()} == dict.fromkeys(counters, 0)
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters()))
    fresh.load_extra_state(opt.extra_state())
    assert {k: int(v) for k, v in fresh.counters().items()} == counters
    for p in model.parameters():  # GAdam's moments and per-tensor step come back (GSGD has none)
        assert sorted(fresh.state.get(p, {})) == sorted(opt.state.get(p, {}))
        for key, value in opt.state.get(p, {}).items():
            assert torch.equal(fresh.state[p][key], value), key


def test_distributed_state_is_recognised_by_its_param_groups():
    """Without the ``"gsgd"`` entry, the parameter groups say who saved the state: GAdam loads its own, and
    refuses torch.optim.Adam's (weight coordinates) and GSGD's; GSGD refuses GAdam's."""
    model, gadam = _trained(GAdam, lr=0.5)
    topo = gadam.topology
    saved = dcp.get_optimizer_state_dict(model, gadam)
    with pytest.raises(TopologyError, match="saved by GAdam/GAdamW"):
        dcp.set_optimizer_state_dict(model, GSGD(model.parameters(), lr=0.1, momentum=0.9, topology=topo), saved)
    adam = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    adam.step()
    model.zero_grad(set_to_none=True)
    with pytest.raises(TopologyError, match="torch.optim.Adam"):
        dcp.set_optimizer_state_dict(
            model, GAdam(model.parameters(), topology=topo), dcp.get_optimizer_state_dict(model, adam)
        )
    _, gsgd = _trained(GSGD, lr=0.1, momentum=0.9)
    with pytest.raises(TopologyError, match="saved by GSGD"):
        GAdam(model.parameters(), topology=topo).load_state_dict(
            {k: v for k, v in gsgd.state_dict().items() if k != "gsgd"}
        )
