"""The "SGD with G-SGD's skeleton initialization" baseline, as a one-call helper.

G-SGD is normally run after :func:`~lightning_gsgd.init_skeleton_` (sigma and tau weights set to 1;
docs/math.md, "Skeleton initialisation"). Comparing G-SGD with plain SGD from PyTorch's default initialization mixes
two effects: the initialization and the geometry of the update. Plain ``torch.optim.SGD`` started
from the same skeleton-initialized weights separates them. This module only combines the existing
pieces (``detect_topology``, ``init_skeleton_``, ``torch.optim.SGD``); it adds no math.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_gsgd.topology.detect import detect_topology
from lightning_gsgd.topology.skeleton import init_skeleton_
from lightning_gsgd.topology.types import Topology


def skeleton_sgd(
    model: nn.Module,
    example_input: Any = None,
    *,
    topology: Topology | None = None,
    **sgd_kwargs: Any,
) -> torch.optim.SGD:
    """Set the skeleton weights of ``model`` as G-SGD would, then return a plain ``torch.optim.SGD``.

    This **changes the function the network computes** (like :func:`~lightning_gsgd.init_skeleton_`):
    call it once, when training from scratch, never when resuming.

    Args:
        model: The model to initialize and optimize.
        example_input: A batch the model accepts, used to detect the topology (not needed when
            ``topology`` is given).
        topology: The model's topology, if already detected.
        **sgd_kwargs: Passed to ``torch.optim.SGD`` (``lr``, ``momentum``, ``weight_decay``, ...).

    Returns:
        ``torch.optim.SGD`` over ``model.parameters()``.

    Raises:
        ValueError: Neither ``example_input`` nor ``topology`` was given.
    """
    if topology is None:
        if example_input is None:
            raise ValueError("skeleton_sgd: pass example_input (to detect the topology) or topology")
        topology = detect_topology(model, example_input)
    init_skeleton_(topology)
    return torch.optim.SGD(model.parameters(), **sgd_kwargs)
