"""BatchNorm models for detection tests (tests/test_detect_bn.py), written like torchvision's.

Each model lists, by hand, what ``bn_mode="exact"`` must find: ``CHAINS`` (every chain's layer names
in order, with the names of its S2 output layers) and ``ALONE`` (S2 layers in no chain).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> list[nn.Module]:
    """conv-BN(-ReLU), torchvision style (no conv bias)."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    return layers + [nn.ReLU(inplace=True)] if act else layers


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        idt = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + idt)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        idt = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + idt)


class ResNetBasic(nn.Module):
    """Stem, a BasicBlock with identity shortcut, one with a projection shortcut, pool, fc. Two residual
    streams (docs/math.md, "Residual streams"): the stem's ``bn1`` with ``layer.0.bn2`` (read by the
    first block's conv1 and the second block's convs), ``layer.1.down.1`` with ``layer.1.bn2`` (read
    by ``fc``)."""

    CHAINS = [
        (
            ("bn1", "layer.0.conv1", "layer.1.down.0", "layer.1.conv1"),
            ("layer.0.conv1", "layer.1.down.0", "layer.1.conv1"),
        ),
        (("layer.0.bn1", "layer.0.conv2"), ("layer.0.conv2",)),
        (("layer.1.down.1", "fc"), ()),
        (("layer.1.bn1", "layer.1.conv2"), ("layer.1.conv2",)),
    ]
    ALONE = ("conv1",)
    TIED = {"bn1": ("layer.0.bn2",), "layer.1.down.1": ("layer.1.bn2",)}

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False), nn.BatchNorm2d(4)
        self.layer = nn.Sequential(BasicBlock(4, 4, 1), BasicBlock(4, 6, 2))
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = self.layer(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ResNetBottleneck(nn.Module):
    """Stem, two Bottleneck blocks (the first with a projection shortcut), pool, fc. The stem's channels
    reach only the first block's conv1 and projection conv: its BatchNorm is a unit, and both convs
    are S2 output layers of its chain. The stream after the first block is one unit per channel,
    written by ``layer.0.down.1``, ``layer.0.bn3`` and ``layer.1.bn3``, read by ``layer.1.conv1`` and
    ``fc``."""

    CHAINS = [
        (("bn1", "layer.0.down.0", "layer.0.conv1"), ("layer.0.down.0", "layer.0.conv1")),
        (("layer.0.down.1", "layer.1.conv1", "fc"), ("layer.1.conv1",)),
        (("layer.0.bn1", "layer.0.conv2"), ("layer.0.conv2",)),
        (("layer.0.bn2", "layer.0.conv3"), ("layer.0.conv3",)),
        (("layer.1.bn1", "layer.1.conv2"), ("layer.1.conv2",)),
        (("layer.1.bn2", "layer.1.conv3"), ("layer.1.conv3",)),
    ]
    ALONE = ("conv1",)
    TIED = {"layer.0.down.1": ("layer.0.bn3", "layer.1.bn3")}

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False), nn.BatchNorm2d(4)
        self.layer = nn.Sequential(Bottleneck(4, 2, 8, 2), Bottleneck(8, 2, 8, 1))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.layer(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class VggMlp(nn.Module):
    """conv-BN-ReLU-pool stages, flatten, an MLP classifier Linear-BN1d-ReLU-Dropout-Linear-ReLU-Linear."""

    CHAINS = [
        (("features.1", "features.4"), ("features.4",)),
        (("features.5", "classifier.0"), ("classifier.0",)),
        (("classifier.1", "classifier.4", "classifier.6"), ()),
    ]
    ALONE = ("features.0",)

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(*cbr(3, 4), nn.MaxPool2d(2), *cbr(4, 5))
        self.classifier = nn.Sequential(
            nn.Linear(5 * 9, 7),
            nn.BatchNorm1d(7),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(7, 6),
            nn.ReLU(True),
            nn.Linear(6, 3),
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.norm2, self.conv2 = nn.BatchNorm2d(2 * growth), nn.Conv2d(2 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        h = self.conv1(F.relu(self.norm1(torch.cat(feats, 1))))
        return self.conv2(F.relu(self.norm2(h)))


class DenseBn(nn.Module):
    """DenseNet-style: a stem conv, a dense block of 3 layers (each reads the concatenation of the stem
    and every earlier layer, through BN-ReLU), a transition BN-ReLU-conv-pool, a BN-ReLU-pool-Linear head.
    The stem conv and every layer's conv2 feed several BatchNorms through the concatenations."""

    CHAINS = [
        (("block.0.norm1", "block.0.conv1"), ("block.0.conv1",)),
        (("block.0.norm2", "block.0.conv2"), ("block.0.conv2",)),
        (("block.1.norm1", "block.1.conv1"), ("block.1.conv1",)),
        (("block.1.norm2", "block.1.conv2"), ("block.1.conv2",)),
        (("block.2.norm1", "block.2.conv1"), ("block.2.conv1",)),
        (("block.2.norm2", "block.2.conv2"), ("block.2.conv2",)),
        (("trans_norm", "trans_conv"), ("trans_conv",)),
        (("head_norm", "fc"), ()),
    ]
    ALONE = ("stem",)

    def __init__(self, growth: int = 2) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.block = nn.ModuleList(DenseLayer(4 + i * growth, growth) for i in range(3))
        c = 4 + 3 * growth
        self.trans_norm, self.trans_conv = nn.BatchNorm2d(c), nn.Conv2d(c, 5, 1, bias=False)
        self.head_norm, self.fc = nn.BatchNorm2d(5), nn.Linear(5, 3)

    def forward(self, x):
        feats = [self.stem(x)]
        for layer in self.block:
            feats.append(layer(feats))
        h = F.avg_pool2d(self.trans_conv(F.relu(self.trans_norm(torch.cat(feats, 1)))), 2)
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.head_norm(h)), 1).flatten(1))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.size()
    x = x.view(n, groups, c // groups, h, w)
    return torch.transpose(x, 1, 2).contiguous().view(n, -1, h, w)


class ShuffleUnit(nn.Module):
    """torchvision's ShuffleNet-V2 unit, stride 1: chunk, conv1x1-BN-ReLU, depthwise conv-BN,
    conv1x1-BN-ReLU on one half, cat, shuffle."""

    def __init__(self, c: int) -> None:
        super().__init__()
        h = c // 2
        self.branch2 = nn.Sequential(*cbr(h, h, 1), *cbr(h, h, 3, groups=h, act=False), *cbr(h, h, 1))

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat((x1, self.branch2(x2)), 1), 2)


class ShuffleBn(nn.Module):
    """Stem conv-BN-ReLU, two ShuffleNet-V2 units, conv-BN-ReLU head, pool, fc. Every BatchNorm whose
    output reaches only 1x1 convs (through ReLU, chunk, cat and shuffles) is a unit: the stem's BN and
    both units' last BNs are in one DAG chain with the convs that read them, each depthwise conv's BN
    in a chain with the 1x1 conv after it; the first BN of each unit feeds a depthwise conv (never a
    chain layer) and stays outside; the depthwise convs are S2 layers alone."""

    CHAINS = [
        (
            ("bn0", "units.0.branch2.0", "units.0.branch2.6", "units.1.branch2.0", "units.1.branch2.6", "head.0"),
            ("units.0.branch2.0", "units.1.branch2.0", "head.0"),
        ),
        (("units.0.branch2.4", "units.0.branch2.5"), ("units.0.branch2.5",)),
        (("units.1.branch2.4", "units.1.branch2.5"), ("units.1.branch2.5",)),
        (("head.1", "fc"), ()),
    ]
    ALONE = ("conv0", "units.0.branch2.3", "units.1.branch2.3")

    def __init__(self) -> None:
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.units = nn.Sequential(ShuffleUnit(8), ShuffleUnit(8))
        self.head = nn.Sequential(*cbr(8, 6, 1))
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        h = self.head(self.units(F.relu(self.bn0(self.conv0(x)))))
        return self.fc(h.mean((2, 3)))


class NormAfter(nn.Module):
    """conv -> a norm -> ReLU -> conv -> BN -> ReLU -> pool -> fc, with the norm chosen by name."""

    def __init__(self, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = {
            "group": lambda: nn.GroupNorm(2, 4),
            "layer": lambda: nn.LayerNorm([4, 6, 6]),
            "instance": lambda: nn.InstanceNorm2d(4, affine=True),
            "bn_no_affine": lambda: nn.BatchNorm2d(4, affine=False),
        }[norm]()
        self.conv2, self.bn2 = nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        h = F.relu(self.norm(self.conv1(x)))
        return self.fc(F.relu(self.bn2(self.conv2(h))).mean((2, 3)))


class SmoothAfterBn(nn.Module):
    """conv-BN-ReLU6, conv-BN-SiLU, pool, fc (MobileNet/EfficientNet style): no S1, S2 rows in both convs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.dw, self.bn_dw = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 5, 1, bias=False), nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        h = F.relu6(self.bn1(self.conv1(x)))
        h = F.relu6(self.bn_dw(self.dw(h)))
        return self.fc(F.silu(self.bn2(self.conv2(h))).mean((2, 3)))


class BnOutput(nn.Module):
    """conv-BN-ReLU-conv-BN, and that last BatchNorm is the model output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 2, 3, padding=1), nn.BatchNorm2d(2)

    def forward(self, x):
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))


class TanhBeforeBn(nn.Module):
    """conv-BN-ReLU, conv-tanh-BN-ReLU, conv-tanh-BN-ReLU, fc: rows before tanh are no S2 rows (tanh does
    not scale), which only a faulty rule would claim."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv1, self.bn1 = nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5)
        self.conv2, self.bn2 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(9, 3)

    def forward(self, x):
        h = F.relu(self.bn1(torch.tanh(self.conv1(F.relu(self.bn0(self.conv0(x)))))))
        g = F.relu(self.bn2(torch.tanh(self.conv2(x))))
        return self.fc(torch.cat((h, g), 1).mean((2, 3)))


def randomize_bn(model: nn.Module) -> nn.Module:
    """Random BatchNorm affines and running statistics (so that no claim holds by accident of init)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.5)
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return model
