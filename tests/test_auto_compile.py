"""``GSGD(compiled=None)``, the default: compiled for large chains when a compiler is there, else eager,
with the reason in the log; a step that fails to compile falls back to the eager step."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from lightning_gsgd import GSGD, GAdam, detect_topology, init_skeleton_
from lightning_gsgd.step import auto_compile as auto
from lightning_gsgd.step.graph import ChainGraphs


def _model(width: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
    return model, torch.randn(8, 784)


def _bound(width: int, caplog: pytest.LogCaptureFixture, **kwargs) -> GSGD:
    model, x = _model(width)
    with caplog.at_level(logging.INFO, logger="lightning_gsgd.optim.gsgd"):
        return GSGD(model.parameters(), lr=0.01, topology=detect_topology(model, x), **kwargs)


def test_small_chains_run_eager_and_say_why(caplog):
    opt = _bound(16, caplog)  # 13k chain parameters
    assert opt.compiled is False
    assert "eager step (compiled=None): the chains hold 13,002 parameters, fewer than 100,000" in caplog.text


def test_large_chains_compile_when_a_compiler_is_there(caplog, monkeypatch):
    monkeypatch.setattr(auto.shutil, "which", lambda name: f"/usr/bin/{name}" if name == "g++" else None)
    opt = _bound(256, caplog)  # 270k chain parameters
    assert opt.compiled is True
    assert "compiled step (compiled=None): the chains hold 269,322 parameters and g++ compiles the step" in caplog.text


def test_large_chains_run_eager_without_a_compiler(caplog, monkeypatch):
    monkeypatch.setattr(auto.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    opt = _bound(256, caplog)
    assert opt.compiled is False
    assert "no C++ compiler was found" in caplog.text


def test_batchnorm_models_compile_like_the_others(caplog, monkeypatch):
    # a model with BatchNorm segments (S2 rows) is compiled by the same rule: its compiled step is the
    # faster form once B per entry is a stored graph output (benchmarks/README.md, ResNet-18)
    monkeypatch.setattr(auto.shutil, "which", lambda name: f"/usr/bin/{name}" if name == "g++" else None)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.Conv2d(64, 256, 3, padding=1),
        nn.BatchNorm2d(256),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(256, 10),
    )
    topo = detect_topology(model, torch.randn(4, 3, 8, 8))
    assert topo.s2_layers() and sum(p.numel() for p in topo.chain_params()) >= auto.AUTO_MIN_PARAMS
    with caplog.at_level(logging.INFO, logger="lightning_gsgd.optim.gsgd"):
        assert GSGD(model.parameters(), lr=0.01, topology=topo).compiled is True
    assert "compiled step (compiled=None)" in caplog.text
    assert GAdam(model.parameters(), lr=1e-3, topology=topo).compiled is True


@pytest.mark.parametrize("explicit", [True, False])
def test_an_explicit_choice_is_kept(caplog, monkeypatch, explicit):
    monkeypatch.setattr(auto.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert _bound(256, caplog, compiled=explicit).compiled is explicit
    assert _bound(16, caplog, compiled=explicit).compiled is explicit
    model, x = _model(256)
    opt = GSGD(model.parameters(), lr=0.01)
    opt.compiled = explicit  # set before bind: bind does not decide again
    opt.bind(detect_topology(model, x))
    assert opt.compiled is explicit


class _Broken(ChainGraphs):
    """A compiler that fails, as torch.compile does without a working C++ compiler."""

    def compiled_for(self, *args, **kwargs):
        def fail(*a, **k):
            raise RuntimeError("InductorError: CppCompileError: no compiler")

        return fail


def _grads(model: nn.Module, x: torch.Tensor) -> None:
    model.zero_grad()
    model(x).logsumexp(1).sum().backward()


def test_a_default_step_that_fails_to_compile_runs_eager_and_warns(caplog, monkeypatch):
    monkeypatch.setattr(auto.shutil, "which", lambda name: f"/usr/bin/{name}")
    model, x = _model(256)
    topo = detect_topology(model, x)
    init_skeleton_(topo)
    twin = copy.deepcopy(model)
    opt = GSGD(model.parameters(), lr=0.01, momentum=0.9, topology=topo)
    ref = GSGD(twin.parameters(), lr=0.01, momentum=0.9, topology=detect_topology(twin, x), compiled=False)
    assert opt.compiled is True
    opt._graphs = _Broken()
    with caplog.at_level(logging.WARNING, logger="lightning_gsgd.optim.gsgd"):
        for _ in range(2):
            for m, o in ((model, opt), (twin, ref)):
                _grads(m, x)
                o.step()
    assert opt.compiled is False and caplog.text.count("compiling the step failed (RuntimeError") == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


def test_an_explicitly_compiled_step_that_fails_raises(monkeypatch):
    model, x = _model(16)
    opt = GSGD(model.parameters(), lr=0.01, topology=detect_topology(model, x), compiled=True)
    opt._graphs = _Broken()
    _grads(model, x)
    with pytest.raises(RuntimeError, match="CppCompileError"):
        opt.step()


def test_the_first_compiled_step_logs_its_compile_time(caplog):
    """Issue 18: the one-time compile cost is reported (once per structure and process)."""
    from tests.models import make

    model, x = make("mlp_unequal")
    topo = detect_topology(model, x)
    opt = GSGD(model.parameters(), lr=1e-3, momentum=0.9, topology=topo, compiled=True)
    opt._graphs = ChainGraphs(backend="eager", fullgraph=True)
    with caplog.at_level(logging.INFO, logger="lightning_gsgd"):
        for _ in range(3):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    lines = [r.getMessage() for r in caplog.records if "took" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("GSGD: the compiled step took "), lines
    (first,) = opt._graphs.compiled.values()
    assert first[0].compile_seconds is not None and first[0].compile_seconds > 0


def test_small_cpu_steps_use_inductors_cpp_wrapper_when_pythons_headers_are_there(monkeypatch):
    below = [torch.zeros(auto.CPP_WRAPPER_MAX_PARAMS - 1)]
    at_max = [torch.zeros(auto.CPP_WRAPPER_MAX_PARAMS // 2), torch.zeros(auto.CPP_WRAPPER_MAX_PARAMS // 2)]
    assert auto.use_cpp_wrapper(below) is True
    assert auto.use_cpp_wrapper(at_max) is False  # the whole step's parameters count
    assert auto.use_cpp_wrapper([torch.zeros(10, device="meta")]) is False  # CPU only
    assert auto.use_cpp_wrapper([]) is False
    monkeypatch.setattr(auto.os.path, "exists", lambda path: False)  # no Python.h: it cannot build
    assert auto.use_cpp_wrapper(below) is False


def test_the_compile_log_line_names_the_cpp_wrapper(caplog):
    model, x = _model(16)
    opt = GSGD(model.parameters(), lr=1e-3, momentum=0.9, topology=detect_topology(model, x), compiled=True)
    init_skeleton_(opt.topology)
    _grads(model, x)
    with caplog.at_level(logging.INFO, logger="lightning_gsgd"):
        opt.step()
    assert "GSGD (Inductor's C++ wrapper): the compiled step took" in caplog.text
