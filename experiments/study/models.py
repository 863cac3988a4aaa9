"""The study's models, built from a name and keyword arguments (``build_model``).

All take flat inputs ``[N, n_features]`` (convolutional models unflatten them to ``[N, 1, n_features]``
themselves), so every model reads the same :class:`~experiments.study.data.StudyData`. The ReLU
models without BatchNorm are ``nn.Sequential`` so that the current ``detect_topology`` sees them as
one chain each; the BN ResNet needs the general (torch.fx) detection.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn


def mlp(n_features: int, hidden: Sequence[int], n_classes: int, bias: bool = True) -> nn.Sequential:
    """Linear-ReLU layers of the given hidden widths, then a Linear classifier (``bias=False``: no biases)."""
    layers: list[nn.Module] = []
    prev = n_features
    for width in hidden:
        layers += [nn.Linear(prev, width, bias=bias), nn.ReLU()]
        prev = width
    layers.append(nn.Linear(prev, n_classes, bias=bias))
    return nn.Sequential(*layers)


def mlp2(n_features: int, n_classes: int, width: int = 128, bias: bool = True) -> nn.Sequential:
    """The paper's MLP question: two hidden layers of ``width`` units."""
    return mlp(n_features, [width, width], n_classes, bias)


def plain_mlp(n_features: int, n_classes: int, depth: int = 6, width: int = 64, bias: bool = True) -> nn.Sequential:
    """A plain MLP with ``depth`` Linear layers (``depth - 1`` hidden layers of ``width`` units).

    ``depth=5, width=64, bias=False`` on MNIST is the G-SGD authors' bias-free MLP 784-64x4-10.
    """
    if depth < 2:
        raise ValueError(f"plain_mlp: depth must be >= 2, got {depth}")
    return mlp(n_features, [width] * (depth - 1), n_classes, bias)


def plain_cnn(
    n_features: int, n_classes: int, channels: int = 16, blocks: Sequence[int] = (2, 2, 2), kernel: int = 3
) -> nn.Sequential:
    """PlainNet-style Conv1d net without BN: stem conv, 3 stages (channels c, 2c, 4c; stride 2 at the
    start of stages 2 and 3), global average pooling, Linear classifier. One ReLU chain end to end.

    Conv layers: ``1 + sum(blocks)``; weight layers: that plus one.
    """
    layers: list[nn.Module] = [nn.Unflatten(1, (1, n_features))]
    layers += [nn.Conv1d(1, channels, kernel, padding=kernel // 2), nn.ReLU()]
    prev = channels
    for stage, n in enumerate(blocks):
        width = channels * 2**stage
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            layers += [nn.Conv1d(prev, width, kernel, stride=stride, padding=kernel // 2), nn.ReLU()]
            prev = width
    layers += [nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(prev, n_classes)]
    return nn.Sequential(*layers)


def plain_cnn2d(
    n_features: int, n_classes: int, channels: int = 8, blocks: Sequence[int] = (2, 2, 2), kernel: int = 3
) -> nn.Sequential:
    """A plain Conv2d net without BN on square images given flat (``n_features = side**2``, 784 for
    MNIST): stem conv with stride 2, 3 stages (channels c, 2c, 4c; stride 2 at the start of stages 2
    and 3), global average pooling, Linear classifier. One ReLU chain end to end; with the defaults
    7 conv layers (28x28 -> 14x14 -> 7x7 -> 4x4) and 8 weight layers, like :func:`plain_cnn`.
    """
    side = round(n_features**0.5)
    if side * side != n_features:
        raise ValueError(f"plain_cnn2d: n_features={n_features} is not a square image")
    layers: list[nn.Module] = [nn.Unflatten(1, (1, side, side))]
    layers += [nn.Conv2d(1, channels, kernel, stride=2, padding=kernel // 2), nn.ReLU()]
    prev = channels
    for stage, n in enumerate(blocks):
        width = channels * 2**stage
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            layers += [nn.Conv2d(prev, width, kernel, stride=stride, padding=kernel // 2), nn.ReLU()]
            prev = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(prev, n_classes)]
    return nn.Sequential(*layers)


class BasicBlock1d(nn.Module):
    """ResNet basic block in 1-D: conv-BN-ReLU-conv-BN plus a (projected) shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(c_out)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv1d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv1d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm1d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class BNResNet(nn.Module):
    """A small BN ResNet on 1-D signals: stem, 3 stages of basic blocks (c, 2c, 4c), GAP, Linear."""

    def __init__(self, n_features: int, n_classes: int, channels: int = 16, blocks: Sequence[int] = (1, 1, 1)) -> None:
        super().__init__()
        self.n_features = n_features
        self.stem = nn.Sequential(nn.Conv1d(1, channels, 3, padding=1, bias=False), nn.BatchNorm1d(channels), nn.ReLU())
        stages: list[nn.Module] = []
        prev = channels
        for stage, n in enumerate(blocks):
            width = channels * 2**stage
            for i in range(n):
                stages.append(BasicBlock1d(prev, width, 2 if stage > 0 and i == 0 else 1))
                prev = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(prev, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = x.view(x.shape[0], 1, self.n_features)
        x = self.pool(self.stages(self.stem(x)))
        return self.fc(x.flatten(1))


class BasicBlock2d(nn.Module):
    """torchvision's ``resnet.BasicBlock``: conv3x3-BN-ReLU-conv3x3-BN, plus the identity or a
    ``downsample`` (conv1x1 with the stride, BN), then ReLU. The ReLUs and the residual add are not
    in-place here (torchvision's are), which changes nothing in the function."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """torchvision's ``resnet18`` structure (``BasicBlock`` x [2, 2, 2, 2], widths w, 2w, 4w, 8w, stride 2
    at the start of stages 2-4, adaptive average pooling, Linear) and its initialization (convs
    ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``, BN weight 1 and bias 0, the Linear
    PyTorch's default), for small square images given flat: the stem is a 3x3 stride-1 conv + BN + ReLU
    without max-pool (torchvision: 7x7 stride 2 on 3 channels, then a 3x3 stride-2 max-pool), so 28x28
    MNIST runs at 28, 14, 7, 4. ``width=64`` is torchvision's width; the study uses 16 (CPU budget).
    """

    def __init__(self, n_features: int, n_classes: int, width: int = 64, in_channels: int = 1) -> None:
        super().__init__()
        side = round((n_features // in_channels) ** 0.5)
        if in_channels * side * side != n_features:
            raise ValueError(f"ResNet18: n_features={n_features} is not {in_channels} square image(s)")
        self.shape = (in_channels, side, side)
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        stages: list[nn.Module] = []
        prev = width
        for i in range(4):
            c = width * 2**i
            stages.append(nn.Sequential(BasicBlock2d(prev, c, 1 if i == 0 else 2), BasicBlock2d(c, c, 1)))
            prev = c
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(prev, n_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x.view(x.shape[0], *self.shape))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp2": mlp2,
    "plain_mlp": plain_mlp,
    "plain_cnn": plain_cnn,
    "plain_cnn2d": plain_cnn2d,
    "bn_resnet": BNResNet,
    "resnet18": ResNet18,
}


def build_model(name: str, n_features: int, n_classes: int, **kwargs: Any) -> nn.Module:
    """Build model ``name`` (a key of :data:`MODELS`) with the given keyword arguments.

    Uses the global torch generator for the default initialization: seed it (or use
    ``torch.random.fork_rng``) around the call, as :func:`experiments.study.harness.initial_model` does.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](n_features, n_classes, **kwargs)
