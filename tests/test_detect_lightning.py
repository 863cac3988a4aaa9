"""Detection on a LightningModule whose forward calls ``self.net(x)`` and functional relu."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_gsgd import detect_topology


class LitClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6))
        self.head = nn.Linear(6, 3)
        self.example_input_array = torch.randn(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.net(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("loss", loss)
        return loss


def test_lightning_module_with_net_and_functional_relu():
    torch.manual_seed(0)
    model = LitClassifier()
    for method in ("auto", "record"):
        topo = detect_topology(model, model.example_input_array, method=method)
        assert [tuple(layer.name for layer in c.layers) for c in topo.chains] == [("net.0", "net.2", "head")]
        assert topo.coverage == 1.0
