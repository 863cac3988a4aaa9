"""Detected DAG chains, stepped: ``detect_topology`` on the DAG models of tests/dag_detect_models.py,
then GSGD (and GAdam) against the brute-force DAG oracle, which reads only the detected ``sources``."""

from __future__ import annotations

import pytest
import torch

from lightning_gsgd import GSGD, GAdamW, detect_topology, init_skeleton_
from tests.dag_detect_models import DAG_MODELS, image
from tests.test_dag_step import _compare


@pytest.mark.parametrize("name", list(DAG_MODELS))
def test_detected_dag_chains_step_as_the_oracle(name):
    torch.manual_seed(0)
    model = DAG_MODELS[name]().double().eval()  # FireNet has a dropout: the two runs must see the same function
    x = image(4)
    topo = detect_topology(model, x)
    assert any(not chain.is_sequence for chain in topo.chains), "no DAG chain detected: the test would be vacuous"
    init_skeleton_(topo)
    hyper = dict(lr=1e-3, momentum=0.9, weight_decay=0.01)
    _compare(model, x, topo, lambda ps, t: GSGD(ps, topology=t, compiled=False, **hyper), 3, torch.optim.SGD, hyper)


@pytest.mark.parametrize("name", ["fire", "dense_block", "shuffle_view"])
def test_detected_dag_chains_gadamw_as_the_oracle(name):
    torch.manual_seed(0)
    model = DAG_MODELS[name]().double().eval()  # FireNet has a dropout: the two runs must see the same function
    x = image(4)
    topo = detect_topology(model, x)
    init_skeleton_(topo)
    hyper = dict(lr=1e-3, weight_decay=0.1)
    _compare(model, x, topo, lambda ps, t: GAdamW(ps, topology=t, **hyper), 4, torch.optim.AdamW, hyper)
