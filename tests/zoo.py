"""A zoo of small float64 models for topology detection, each with the chains it must have.

Every entry says which layers form each chain (module names, in order); coverage is then computed
in the tests from the modules' own parameter counts, independently of the detector.
Classes live at module level so that DDP spawn could pickle them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class FunctionalMLP(nn.Module):
    """Custom forward with every spelling of ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 7)
        self.fc2 = nn.Linear(7, 6)
        self.fc3 = nn.Linear(6, 8)
        self.fc4 = nn.Linear(8, 4)
        self.fc5 = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x))
        h = torch.relu(self.fc2(h))
        h = self.fc3(h).relu()
        h = F.leaky_relu(self.fc4(h), 0.2)
        return self.fc5(F.dropout(h, 0.1, self.training))


class VGG(nn.Module):
    """VGG-style: conv blocks with biases, max-pool, dropout, flatten, Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(4, 5, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(5, 6, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(0.2), nn.Linear(6 * 2 * 2, 7), nn.ReLU(), nn.Dropout(0.2), nn.Linear(7, 3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        h = h.view(h.size(0), -1)
        return self.classifier(h)


class PlainNet(nn.Module):
    """CIFAR-style plain net: stem, stages of 3x3 conv-[BN]-ReLU (stride 2 between), GAP, Linear."""

    def __init__(self, bn: bool = False, widths: tuple[int, ...] = (4, 6), depth: int = 2) -> None:
        super().__init__()
        norm = nn.BatchNorm2d if bn else (lambda c: nn.Identity())
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, padding=1, bias=not bn), norm(widths[0]), nn.ReLU()]
        c = widths[0]
        for i, w in enumerate(widths):
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                layers += [nn.Conv2d(c, w, 3, stride=stride, padding=1, bias=not bn), norm(w), nn.ReLU()]
                c = w
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


class BasicBlock(nn.Module):
    """ResNet basic block: conv-[BN]-ReLU-conv-[BN], plus identity or 1x1-conv shortcut, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, bn: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=not bn)
        self.bn1 = nn.BatchNorm2d(cout) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=not bn)
        self.bn2 = nn.BatchNorm2d(cout) if bn else nn.Identity()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            proj: list[nn.Module] = [nn.Conv2d(cin, cout, 1, stride=stride, bias=not bn)]
            if bn:
                proj.append(nn.BatchNorm2d(cout))
            self.shortcut = nn.Sequential(*proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class ResNet(nn.Module):
    """CIFAR-style ResNet with BasicBlocks (two stages of two blocks)."""

    def __init__(self, bn: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=not bn)
        self.bn1 = nn.BatchNorm2d(4) if bn else nn.Identity()
        self.layer1 = nn.Sequential(BasicBlock(4, 4, 1, bn), BasicBlock(4, 4, 1, bn))
        self.layer2 = nn.Sequential(BasicBlock(4, 6, 2, bn), BasicBlock(6, 6, 1, bn))
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer2(self.layer1(out))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.fc(out)


class GeluMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


class LayerNormMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.ln1 = nn.Linear(5, 6), nn.LayerNorm(6)
        self.fc2, self.ln2 = nn.Linear(6, 6), nn.LayerNorm(6)
        self.fc3 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.ln1(self.fc1(x)))
        h = F.relu(self.ln2(self.fc2(h)))
        return self.fc3(h)


class ReuseMLP(nn.Module):
    """``shared`` is applied twice: its weights and the links through it are left out."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(6, 4)
        self.shared = nn.Linear(4, 4)
        self.fc3, self.fc4 = nn.Linear(4, 7), nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc2(F.relu(self.fc1(x))))
        h = F.relu(self.shared(h))
        h = F.relu(self.shared(h))
        return self.fc4(F.relu(self.fc3(h)))


class DictInputNet(nn.Module):
    """``forward(image, extra)``, called with a dict of keyword arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.fc1 = nn.Linear(5 * 2 * 2, 6)
        self.extra = nn.Linear(3, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, image: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.conv1(image)), 2)
        h = F.relu(self.conv2(h))
        h = F.avg_pool2d(h, 2).reshape(h.shape[0], -1)
        h = self.fc1(h) + self.extra(extra)
        return self.head(F.relu(h))


class BatchDictNet(nn.Module):
    """``forward(batch)`` reading tensors from one dict argument (passed as ``(batch,)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(5, 2)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        h = F.relu(self.fc1(batch["x"]))
        h = F.relu(self.fc2(h))
        return {"logits": self.fc3(h), "aux": batch["y"] * 2}


class DynamicNet(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, the recorder handles it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x))
        if x.sum() > -1e9:  # always true, but fx cannot know
            h = F.relu(self.fc2(h))
        return self.fc3(h)


class TupleInputNet(nn.Module):
    """``forward(x, mask)`` called with a tuple; the mask multiplies the output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x))) * mask


class DepthwiseNet(nn.Module):
    """A depthwise conv ends the chain; the pointwise conv after it starts a new one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.pw = nn.Conv2d(4, 5, 1)
        self.conv3 = nn.Conv2d(5, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        h = F.relu(self.dw(h))
        h = F.relu(self.pw(h))
        return self.conv3(h).mean((2, 3))


class TiedNet(nn.Module):
    """``dec`` shares its weight with ``tied`` (as in weight tying); both are left out."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.tied, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 6, bias=False), nn.Linear(6, 5)
        self.dec = nn.Linear(6, 6, bias=False)
        self.dec.weight = self.tied.weight
        self.fc3 = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.tied(F.relu(self.fc1(x))))
        h = F.relu(self.dec(h))
        return self.fc3(h) + self.fc2(h).sum(1, keepdim=True)


class PermutedFlattenNet(nn.Module):
    """Flattens channel-last (permute first): the Linear does not read channels as units."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(x))
        return self.fc(h.permute(0, 2, 3, 1).flatten(1))


@dataclass
class ZooModel:
    """A model factory, an example-input factory and the chains the model must have."""

    build: Callable[[], nn.Module]
    example: Callable[[], Any]
    chains: list[tuple[str, ...]]
    notes: dict[str, str] = field(default_factory=dict)  # parameter name -> substring of its reason
    alone: tuple[str, ...] = ()  # layers with S2 rows in no chain (bn_mode="exact")
    tied: tuple[str, ...] = ()  # BatchNorms tied to a chain layer's units (residual streams)


def _t(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64)


ZOO: dict[str, ZooModel] = {
    "functional_mlp": ZooModel(FunctionalMLP, lambda: _t(4, 5), [("fc1", "fc2", "fc3", "fc4", "fc5")]),
    "vgg": ZooModel(
        VGG,
        lambda: _t(2, 3, 8, 8),
        [("features.0", "features.2", "features.5", "classifier.1", "classifier.4")],
    ),
    "plainnet": ZooModel(PlainNet, lambda: _t(2, 3, 8, 8), [("body.0", "body.3", "body.6", "body.9", "body.12", "fc")]),
    "resnet": ZooModel(
        ResNet,
        lambda: _t(2, 3, 8, 8),
        [(f"layer{s}.{b}.conv1", f"layer{s}.{b}.conv2") for s in (1, 2) for b in (0, 1)],
        {"conv1.weight": "consumers", "layer2.0.shortcut.0.weight": "'layer2.0.shortcut.0' is in no ReLU chain"},
    ),
    "plainnet_bn": ZooModel(  # BatchNorm segments (bn_mode="exact"): each BN affine starts a chain
        lambda: PlainNet(bn=True),
        lambda: _t(4, 3, 8, 8),
        [("body.1", "body.3"), ("body.4", "body.6"), ("body.7", "body.9"), ("body.10", "body.12"), ("body.13", "fc")],
        alone=("body.0",),
    ),
    "resnet_bn": ZooModel(  # each branch's BN1 -> conv2 is a chain; each stage's stream is one (tied BNs)
        lambda: ResNet(bn=True),
        lambda: _t(4, 3, 8, 8),
        [
            ("bn1", "layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.shortcut.0"),
            ("layer1.0.bn1", "layer1.0.conv2"),
            ("layer1.1.bn1", "layer1.1.conv2"),
            ("layer2.0.bn1", "layer2.0.conv2"),
            ("layer2.0.bn2", "layer2.1.conv1", "fc"),
            ("layer2.1.bn1", "layer2.1.conv2"),
        ],
        alone=("conv1",),
        tied=("layer1.0.bn2", "layer1.1.bn2", "layer2.0.shortcut.1", "layer2.1.bn2"),
    ),
    "gelu_mlp": ZooModel(GeluMLP, lambda: _t(4, 5), [], {"fc1.weight": "gelu"}),
    "layernorm_mlp": ZooModel(
        LayerNormMLP, lambda: _t(4, 5), [], {"fc2.weight": "LayerNorm 'ln2'", "ln1.weight": "LayerNorm 'ln1'"}
    ),
    "reuse_mlp": ZooModel(
        ReuseMLP, lambda: _t(4, 5), [("fc1", "fc2"), ("fc3", "fc4")], {"shared.weight": "called 2 times"}
    ),
    "dict_input": ZooModel(
        DictInputNet,
        lambda: {"image": _t(2, 2, 8, 8), "extra": _t(2, 3)},
        [("conv1", "conv2", "fc1")],
        {"extra.weight": "add"},
    ),
    "batch_dict": ZooModel(BatchDictNet, lambda: ({"x": _t(3, 4), "y": _t(3, 1)},), [("fc1", "fc2", "fc3")]),
    "dynamic": ZooModel(DynamicNet, lambda: _t(3, 4), [("fc1", "fc2", "fc3")]),
    "tuple_input": ZooModel(TupleInputNet, lambda: (_t(3, 4), _t(3, 1)), [("fc1", "fc2")]),
    "depthwise": ZooModel(
        DepthwiseNet, lambda: _t(2, 2, 6, 6), [("pw", "conv3")], {"dw.weight": "depthwise convolution (groups=4)"}
    ),
    "tied": ZooModel(TiedNet, lambda: _t(3, 4), [], {"tied.weight": "shared weight"}),
    "permuted_flatten": ZooModel(
        PermutedFlattenNet,
        lambda: _t(2, 2, 4, 4),
        [],
        {"conv.weight": "permute reorders the entries (not supported yet)"},
    ),
}


def make(name: str, seed: int = 0) -> tuple[nn.Module, Any]:
    """The zoo model ``name`` in float64 and its example input, seeded."""
    torch.manual_seed(seed)
    entry = ZOO[name]
    model = entry.build().to(torch.float64)
    return model, entry.example()
