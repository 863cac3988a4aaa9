"""``GAdam(compiled=...)``: the ``compiled=None`` default and its fallback, the replay of the last
step's arguments, and the synchronization-free compiled step (no host reads)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch._dynamo
from torch import nn

from lightning_gsgd import GAdam, GAdamW, detect_topology, init_skeleton_
from lightning_gsgd.step import auto_compile as auto
from lightning_gsgd.step.adam_graph import AdamGraphs
from tests.models import initialize, make
from tests.test_gadam_compiled import _loss, _same_state, _traced


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ---------------------------------------------------------------- compiled=None, the default
def _mlp(width: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, width), nn.ReLU(), nn.Linear(width, 10)), torch.randn(8, 784)


def test_the_default_compiles_large_chains_only(caplog, monkeypatch):
    monkeypatch.setattr(auto.shutil, "which", lambda name: f"/usr/bin/{name}" if name == "g++" else None)
    with caplog.at_level(logging.INFO, logger="lightning_gsgd.optim.gadam"):
        for width, want in ((16, False), (256, True)):
            model, x = _mlp(width)
            assert GAdamW(model.parameters(), topology=detect_topology(model, x)).compiled is want
    assert "GAdamW: eager step (compiled=None): the chains hold 12,730 parameters" in caplog.text
    assert "GAdamW: compiled step (compiled=None): the chains hold 203,530 parameters and g++" in caplog.text
    model, x = _mlp(256)
    opt = GAdam(model.parameters(), compiled=False)
    opt.bind(detect_topology(model, x))
    assert opt.compiled is False
    with pytest.raises(TypeError, match="GAdam: compiled must be True or False"):
        opt.compiled = "yes"  # type: ignore[assignment]
    with pytest.raises(TypeError, match="GAdamW: compiled must be True or False"):
        GAdamW(model.parameters(), compiled="yes")  # type: ignore[arg-type]


class _Broken(AdamGraphs):
    """A compiler that fails, as torch.compile does without a working C++ compiler."""

    def compiled_for(self, *args, **kwargs):
        def fail(*a, **k):
            raise RuntimeError("InductorError: CppCompileError: no compiler")

        return fail


def test_a_default_step_that_fails_to_compile_runs_eager_and_warns(caplog, monkeypatch):
    monkeypatch.setattr(auto.shutil, "which", lambda name: f"/usr/bin/{name}")
    model, x = _mlp(256)
    init_skeleton_(detect_topology(model, x))
    twin = copy.deepcopy(model)
    opt = GAdam(model.parameters(), lr=0.01, topology=detect_topology(model, x))
    ref = GAdam(twin.parameters(), lr=0.01, topology=detect_topology(twin, x), compiled=False)
    assert opt.compiled is True
    opt._graphs = _Broken()
    with caplog.at_level(logging.WARNING, logger="lightning_gsgd.optim.gadam"):
        for _ in range(2):
            for m, o in ((model, opt), (twin, ref)):
                o.zero_grad()
                m(x).logsumexp(1).sum().backward()
                o.step()
    assert opt.compiled is False and caplog.text.count("GAdam: compiling the step failed (RuntimeError") == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    forced = GAdam(twin.parameters(), lr=0.01, topology=detect_topology(twin, x), compiled=True)
    forced._graphs = _Broken()
    with pytest.raises(RuntimeError, match="CppCompileError"):
        forced.step()


@pytest.mark.slow  # ~9 s of compiling
def test_the_replay_is_used_only_while_its_arguments_are_valid(monkeypatch):
    # constant hyper-parameters: later steps replay the last step's arguments with the new gradients;
    # a new state (load_state_dict), a parameter without gradient or a changed group rebuilds them
    model, x = make("mixed")
    initialize(model, detect_topology(model, x), "skeleton_rescaled")
    replays = []

    def make_opt(m, compiled):
        opt = GAdam(m.parameters(), lr=1e-3, weight_decay=0.01, topology=detect_topology(m, x), compiled=compiled)
        if compiled:
            step = opt._compiled_step
            replay = step.replay
            monkeypatch.setattr(step, "replay", lambda *a: replays.append(replay(*a)) or replays[-1])
        return opt

    def change(k, m):
        opt = graph if m is model else eager
        if k == 3:
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        if k == 5:
            list(m.parameters())[-1].grad = None
        if k == 7:
            opt.param_groups[0]["amsgrad"] = True

    graph = eager = None
    twin = copy.deepcopy(model)
    graph, eager = _traced(make_opt(model, True)), make_opt(twin, False)
    for k in range(10):
        for m, o in ((model, graph), (twin, eager)):
            o.zero_grad()
            _loss(m, x).backward()
            change(k, m)
            o.step()
    # a step that makes state (0; 7: amsgrad's maximum) leaves nothing to replay, the next one rebuilds;
    # 3 (a new state), 5 and 6 (a gradient gone, then back) rebuild
    assert replays == [False, False, True, False, True, False, False, False, False, True]
    _same_state(model, twin, graph, eager, rtol=1e-10, atol=1e-12)


def test_the_sync_free_compiled_step_reads_nothing_on_the_host():
    # host_reads=False is the accelerators' path: after the step that compiles (Dynamo reads 0-d inputs
    # then), no step reads a value on the host: a replayed step, an lr change, a skipped step
    from tests.test_step_nosync import no_host_reads

    model, x = make("cnn")
    initialize(model, detect_topology(model, x), "skeleton_rescaled")
    twin = copy.deepcopy(model)
    opts = []
    for m, host_reads in ((model, False), (twin, None)):
        opt = _traced(GAdam(m.parameters(), lr=1e-2, amsgrad=True, topology=detect_topology(m, x), compiled=True))
        opt.host_reads = host_reads
        opts.append(opt)
    for k in range(5):
        for m, opt in zip((model, twin), opts):
            opt.zero_grad()
            _loss(m, x).backward()
            if k == 3:
                next(iter(m.parameters())).grad.view(-1)[0] = float("nan")
            if k == 4:
                opt.param_groups[0]["lr"] = 5e-3
            if opt.host_reads is False and k > 0:
                with no_host_reads():
                    opt.step()
            else:
                opt.step()
    sync_free, cpu = opts
    assert int(sync_free.skipped_steps) == int(cpu.skipped_steps) == 1 and int(sync_free.steps) == 4
    _same_state(model, twin, sync_free, cpu, rtol=0, atol=0)
