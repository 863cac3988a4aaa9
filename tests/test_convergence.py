"""G-SGD trains small float32 nets on sklearn digits (table-driven, a few seconds in all).

Each row: model factory, GSGD hyper-parameters, steps, and the largest acceptable cross-entropy on
the whole data set after training (from ln(10) ~ 2.3; every threshold is about twice what a
correct implementation reaches, measured when the table was written).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_gsgd import GSGD, detect_topology, init_skeleton_

BATCH = 64


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def deep_mlp() -> nn.Sequential:
    # depth where G-SGD from PyTorch's default init fails without the skeleton init (gsgd-math.md section 5)
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(64, 64), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(64, 10))


def cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(256, 10),
    )


TABLE = [
    (mlp, dict(lr=0.2), 100, 0.35),
    (mlp, dict(lr=0.1, momentum=0.9, weight_decay=1e-4), 100, 0.2),
    (mlp, dict(lr=0.02, momentum=0.9, nesterov=True), 100, 0.3),
    (deep_mlp, dict(lr=0.05, momentum=0.9), 100, 0.15),
    (cnn, dict(lr=0.05, momentum=0.9), 100, 0.15),
    (cnn, dict(lr=0.02, momentum=0.9, nesterov=True, weight_decay=1e-4), 100, 0.25),
]


@pytest.fixture(autouse=True)
def one_thread():
    """These nets are too small to gain from intra-op threads; on a loaded 2-core machine the
    threads' spin-waits made the table 30x slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target)


@pytest.mark.parametrize(
    "factory,hyper,steps,max_loss",
    TABLE,
    ids=[f"{f.__name__}-{'-'.join(f'{k}={v}' for k, v in h.items())}" for f, h, _, _ in TABLE],
)
def test_gsgd_trains_float32_digits(digits, factory, hyper, steps, max_loss):
    x, y = digits
    torch.manual_seed(0)
    model = factory()
    topo = detect_topology(model, x[:2])
    assert topo.coverage == 1.0
    init_skeleton_(topo)
    opt = GSGD(model.parameters(), topology=topo, **hyper)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (BATCH,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        logits = model(x)
    loss = float(nn.functional.cross_entropy(logits, y))
    assert loss <= max_loss
    # float32 end to end: parameters and momentum buffers stay float32 and finite, no step skipped
    assert int(opt.steps) == steps and int(opt.skipped_steps) == 0
    for p in model.parameters():
        assert p.dtype == torch.float32 and torch.isfinite(p).all()
        if "momentum" in hyper:
            assert opt.state[p]["momentum_buffer"].dtype == torch.float32
    assert logits.dtype == torch.float32
