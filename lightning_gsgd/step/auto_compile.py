"""Whether ``GSGD(compiled=None)``, the default, runs the compiled step: decided once, at ``bind``.

The compiled step (:mod:`lightning_gsgd.step.graph`) is faster per step than the eager one on every
model measured (``benchmarks/README.md``), but its first step compiles it, which takes seconds and
needs a working compiler: a C++ compiler on the CPU, Triton on CUDA. So the default compiles when
the chains hold at least :data:`AUTO_MIN_PARAMS` parameters (below that, the step costs little next to
the forward and backward passes and the compile time would not be earned back in a short fit) and
the compiler is there; otherwise it runs the eager step, and says why in the log.
"""

from __future__ import annotations

import importlib.util
import os
import shutil

from lightning_gsgd.topology.types import Topology

#: Chain parameters from which the default compiles the step (the 4-conv CNN of the benchmarks has 0.11 M).
AUTO_MIN_PARAMS = 100_000


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
