"""Train an MLP with G-SGD on scikit-learn's bundled digits and print its test accuracy.

Runs offline on a CPU in a few seconds: ``python examples/quickstart.py``.
"""

from __future__ import annotations

import logging
import sys

import torch
from sklearn.datasets import load_digits
from torch import nn

from lightning_gsgd import GSGD, detect_topology, init_skeleton_

log = logging.getLogger("quickstart")


def main(epochs: int = 20, lr: float = 0.03, seed: int = 0) -> float:
    torch.manual_seed(seed)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x))
    train, test = perm[:1400], perm[1400:]

    model = nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10),
    )  # fmt: skip
    topology = detect_topology(model, x[:2])
    log.info("%s", topology.summary())
    init_skeleton_(topology)
    opt = GSGD(model.parameters(), lr=lr, momentum=0.9, topology=topology)
    for _ in range(epochs):
        order = train[torch.randperm(len(train))]
        for i in range(0, len(order), 64):
            batch = order[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()
    with torch.no_grad():
        acc = (model(x[test]).argmax(1) == y[test]).float().mean().item()
    return acc


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    accuracy = main()
    log.info("G-SGD test accuracy on digits: %.3f", accuracy)
