"""lightning-gsgd: G-SGD (SGD in the positively scale-invariant space of ReLU networks) for Lightning."""

from lightning_gsgd.baselines import skeleton_sgd
from lightning_gsgd.detect import detect_topology
from lightning_gsgd.optim import GSGD
from lightning_gsgd.path_sgd import PathSGD
from lightning_gsgd.selfcheck import check_invariance, invariance_error
from lightning_gsgd.skeleton import init_skeleton_, random_unit_factors, rescale_hidden_units_
from lightning_gsgd.topology import Chain, ChainLayer, Excluded, Topology, TopologyError

__all__ = [
    "GSGD",
    "Chain",
    "ChainLayer",
    "Excluded",
    "PathSGD",
    "Topology",
    "TopologyError",
    "check_invariance",
    "detect_topology",
    "init_skeleton_",
    "invariance_error",
    "random_unit_factors",
    "rescale_hidden_units_",
    "skeleton_sgd",
]

__version__ = "0.1.0"
