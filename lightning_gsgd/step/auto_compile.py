"""Whether ``GSGD(compiled=None)``, the default, runs the compiled step: decided once, at ``bind``.

The compiled step (:mod:`lightning_gsgd.step.graph`) is faster per step than the eager one on every
model measured (``benchmarks/README.md``), but its first step compiles it, which takes seconds and
needs a working compiler: a C++ compiler on the CPU, Triton on CUDA. So the default compiles when
the chains hold at least :data:`AUTO_MIN_PARAMS` parameters (below that, the step costs little next to
the forward and backward passes and the compile time would not be earned back in a short fit) and
the compiler is there; otherwise it runs the eager step, and says why in the log.

On the CPU a small step is mostly the cost of calling the graph, not its arithmetic: Inductor's
Python wrapper makes a view or a buffer per tensor on every call. Below
:data:`CPP_WRAPPER_MAX_PARAMS` chain parameters the graph is therefore compiled with Inductor's C++
wrapper (``cpp_wrapper``), which does that in C++ (the 4-conv CNN's step with momentum, one thread:
1.25x torch's SGD against 1.48x with the Python wrapper, ``benchmarks/README.md``); it needs
Python's C headers and costs a few seconds more at the first compile. Above it the gain is a few
percent of the step and the C++ wrapper of a large model takes long to compile (ResNet-18: 201 s
against 128 s with an empty Inductor cache), so the Python wrapper stays.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sysconfig

import torch

from lightning_gsgd.topology.types import Topology

#: Chain parameters from which the default compiles the step (the 4-conv CNN of the benchmarks has 0.11 M).
AUTO_MIN_PARAMS = 100_000

#: Chain parameters below which a CPU step is compiled with Inductor's C++ wrapper (see the module docstring).
CPP_WRAPPER_MAX_PARAMS = 1_000_000


def auto_compile(topology: Topology) -> tuple[bool, str]:
    """``(compile?, why)`` for ``GSGD(compiled=None)`` bound to ``topology``."""
    params = topology.chain_params()
    n = sum(p.numel() for p in params)
    if n < AUTO_MIN_PARAMS:
        return False, f"the chains hold {n:,} parameters, fewer than {AUTO_MIN_PARAMS:,}: the eager step is cheap"
    device = params[0].device
    if device.type == "cpu":
        compiler = _cpp_compiler()
        if compiler is None:
            return False, "no C++ compiler was found for torch.compile (g++, c++, clang++ or $CXX)"
        return True, f"the chains hold {n:,} parameters and {compiler} compiles the step"
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return False, "Triton, which torch.compile needs on CUDA, is not installed"
        return True, f"the chains hold {n:,} parameters and Triton compiles the step"
    return False, f"the step is not compiled on {device.type} devices by default (pass compiled=True to try)"


def _cpp_compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def use_cpp_wrapper(weights: list[torch.Tensor]) -> bool:
    """Whether the compiled step of these chain weights uses Inductor's C++ wrapper: on the CPU, below
    :data:`CPP_WRAPPER_MAX_PARAMS` parameters, with Python's C headers installed (it builds an extension)."""
    if not weights or weights[0].device.type != "cpu":
        return False
    if sum(w.numel() for w in weights) >= CPP_WRAPPER_MAX_PARAMS:
        return False
    return os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))
