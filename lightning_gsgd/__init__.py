"""lightning-gsgd: G-SGD (SGD in the positively scale-invariant space of ReLU networks) for Lightning.

The core (``GSGD``, ``detect_topology``, the topology and skeleton helpers) imports only torch.
``GSGDCallback`` and ``GSGDMixin`` import Lightning, on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_gsgd.diagnostics.metrics import PathDiagnostics
from lightning_gsgd.optim.baselines import skeleton_sgd
from lightning_gsgd.optim.gadam import GAdam, GAdamW
from lightning_gsgd.optim.gsgd import GSGD
from lightning_gsgd.optim.path_sgd import PathSGD
from lightning_gsgd.topology.detect import detect_topology
from lightning_gsgd.topology.selfcheck import check_invariance, invariance_error
from lightning_gsgd.topology.shard import shard_topology
from lightning_gsgd.topology.skeleton import init_skeleton_, random_unit_factors, rescale_hidden_units_
from lightning_gsgd.topology.types import Chain, ChainLayer, Excluded, Source, Topology, TopologyError

if TYPE_CHECKING:
    from lightning_gsgd.lightning.callback import GSGDCallback
    from lightning_gsgd.lightning.mixin import GSGDMixin

# Public names whose modules import Lightning: loaded on first attribute access (PEP 562).
_LAZY = {"GSGDCallback": "lightning_gsgd.lightning.callback", "GSGDMixin": "lightning_gsgd.lightning.mixin"}

__all__ = [
    "GSGD",
    "GAdam",
    "GAdamW",
    "Chain",
    "ChainLayer",
    "Excluded",
    "GSGDCallback",
    "GSGDMixin",
    "PathDiagnostics",
    "PathSGD",
    "Source",
    "Topology",
    "TopologyError",
    "check_invariance",
    "detect_topology",
    "init_skeleton_",
    "invariance_error",
    "random_unit_factors",
    "rescale_hidden_units_",
    "shard_topology",
    "skeleton_sgd",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_gsgd' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
