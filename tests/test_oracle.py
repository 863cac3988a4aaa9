"""Acceptance 1: one or more GSGD steps equal the brute-force path-space oracle (float64)."""

from __future__ import annotations

import pytest

from lightning_gsgd import GSGD
from tests.models import INITS, MODELS
from tests.oracle import run_against_oracle


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize(
    "hyper,steps",
    [
        (dict(lr=1e-3), 1),
        (dict(lr=1e-3, momentum=0.9, weight_decay=0.01), 3),
        (dict(lr=1e-3, momentum=0.5, dampening=0.3, weight_decay=0.001), 3),
        (dict(lr=1e-3, momentum=0.9, nesterov=True), 3),
    ],
)
def test_step_matches_path_space_oracle(name, init, hyper, steps):
    run_against_oracle(name, init, hyper, steps, lambda params, topo, **h: GSGD(params, topology=topo, **h))
