"""The project's model zoo: small float64 models used across the tests (module level so that DDP spawn can
pickle them), and the float32 models the benchmarks time (``BENCH_MODELS``, larger)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lightning_gsgd import Topology, init_skeleton_, random_unit_factors, rescale_hidden_units_


def mlp_equal(bias: bool = True) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(4, 5, bias=bias),
        nn.ReLU(),
        nn.Linear(5, 5, bias=bias),
        nn.ReLU(),
        nn.Linear(5, 5, bias=bias),
        nn.ReLU(),
        nn.Linear(5, 3, bias=bias),
    )


def mlp_unequal(bias: bool = True) -> nn.Sequential:
    widths = [5, 7, 4, 9, 6, 3]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2:
            layers.append(nn.LeakyReLU(0.1) if i % 2 else nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def cnn(bias: bool = True) -> nn.Sequential:
    # 8x8 input: conv(pad 1) 8x8 -> maxpool 4x4 -> conv 2x2 -> avgpool(1) -> flatten 24 -> 5 -> 3
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=bias),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Sequential(nn.Conv2d(4, 6, 3, bias=bias), nn.ReLU(), nn.AvgPool2d(1), nn.Dropout(0.0)),
        nn.Flatten(),
        nn.Linear(24, 5, bias=bias),
        nn.ReLU(),
        nn.Linear(5, 3, bias=bias),
    )


def cnn_strided_1d() -> nn.Sequential:
    # Conv1d with stride and an even kernel, adaptive pooling to 1, flatten, linear head.
    return nn.Sequential(
        nn.Conv1d(1, 3, 4, stride=2),
        nn.ReLU(),
        nn.Conv1d(3, 5, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(2),
        nn.Flatten(),
        nn.Linear(10, 4),
    )


def tiny_mlp(bias: bool = True) -> nn.Sequential:
    # 3-4-5-2: 120 input->output paths, small enough to enumerate (tests/test_invariants.py).
    return nn.Sequential(nn.Linear(3, 4, bias=bias), nn.ReLU(), nn.Linear(4, 5, bias=bias), nn.ReLU(), nn.Linear(5, 2))


def tiny_cnn(bias: bool = True) -> nn.Sequential:
    # 5x5 input: conv 3x3 -> 3x3 map, conv 2x2 -> 2x2 map, flatten 2 channels x 4 positions -> 2.
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, bias=bias),
        nn.ReLU(),
        nn.Conv2d(3, 2, 2, bias=bias),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8, 2),
    )


def mixed() -> nn.Sequential:
    # Two chains (0..2 and 6..8) around parameters that no chain covers (GELU ends the first chain,
    # LayerNorm mixes units): those, and both chains' output biases, get plain SGD.
    return nn.Sequential(
        nn.Linear(4, 6),
        nn.ReLU(),
        nn.Linear(6, 5),
        nn.GELU(),
        nn.Linear(5, 5),
        nn.LayerNorm(5),
        nn.Linear(5, 4),
        nn.ReLU(),
        nn.Linear(4, 3),
    )


def two_chains() -> nn.Sequential:
    """4-6-5 | LayerNorm(5) | 5-7-3: the LayerNorm splits this MLP into two chains and is left to plain SGD."""
    return nn.Sequential(
        nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)
    )


MODELS = {
    "mlp_equal": (mlp_equal, (6, 4)),
    "mlp_equal_nobias": (lambda: mlp_equal(False), (6, 4)),
    "mlp_unequal": (mlp_unequal, (6, 5)),
    "cnn": (cnn, (3, 2, 8, 8)),
    "cnn_nobias": (lambda: cnn(False), (3, 2, 8, 8)),
    "cnn1d": (cnn_strided_1d, (3, 1, 12)),
    "mixed": (mixed, (6, 4)),
}


# --- the benchmarks' models


def bench_mlp() -> nn.Sequential:
    """MLP 784-1024-1024-1024-10 (2.9M parameters)."""
    return _flat_mlp([784, 1024, 1024, 1024, 10])


def bench_mlp6() -> nn.Sequential:
    """6-layer MLP with unequal widths 784-1200-600-1000-300-800-10 (2.6M parameters)."""
    return _flat_mlp([784, 1200, 600, 1000, 300, 800, 10])


def _flat_mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def bench_cnn() -> nn.Sequential:
    """4 convs with 64 channels on 3x16x16 inputs, 2 max-pools, linear head (0.13M parameters)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 10),
    )


def bench_fire() -> nn.Sequential:
    """SqueezeNet-style DAG chain on 3x16x16 inputs: a stem conv, two Fire modules (squeeze 1x1 to 16,
    expand 1x1 and 3x3 to 64 each, concatenated), a 1x1 conv classifier, average pool (0.03M parameters)."""
    from tests.dag_detect_models import Fire

    return nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        Fire(64, 16, 64, 64),
        Fire(128, 16, 64, 64),
        nn.MaxPool2d(2),
        nn.Conv2d(128, 10, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


class _Basic(nn.Module):
    """torchvision's ResNet BasicBlock: conv-BN-ReLU-conv-BN, plus the identity or a 1x1 conv-BN projection."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


def bench_resnet18() -> nn.Sequential:
    """torchvision's ResNet-18 layout (BasicBlocks [2, 2, 2, 2], widths 64-512, BatchNorm, a 1000-way
    head replaced by 10) with a CIFAR stem (3x3 conv, no max-pool) for 3x32x32 inputs (11.2M parameters)."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [_Basic(cin, cout, stride), _Basic(cout, cout, 1)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10))


#: The benchmarks' models (``benchmarks/``): name -> (builder, input shape).
BENCH_MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp 784-1024x3-10": (bench_mlp, (128, 1, 28, 28)),
    "mlp6 784-1200-600-1000-300-800-10": (bench_mlp6, (128, 1, 28, 28)),
    "cnn 4x conv64 16x16": (bench_cnn, (64, 3, 16, 16)),
    "fire dag 2x Fire 16x16": (bench_fire, (64, 3, 16, 16)),
    "resnet18 BN 32x32": (bench_resnet18, (32, 3, 32, 32)),
}


def make(name: str, seed: int = 0, dtype=torch.float64):
    factory, shape = MODELS[name]
    torch.manual_seed(seed)
    model = factory().to(dtype)
    x = torch.randn(*shape, dtype=dtype)
    return model, x


INITS = ["skeleton", "skeleton_rescaled", "order_one"]


def initialize(model: nn.Module, topo: Topology, mode: str) -> None:
    """Set ``model``'s weights for an oracle comparison; ``mode`` is one of :data:`INITS`.

    ``skeleton``: skeleton weights 1. ``skeleton_rescaled``: then every hidden unit rescaled by a
    random factor, which moves every sigma/tau weight off 1 so that the B and F products matter.
    ``order_one``: every parameter drawn with magnitude in [0.5, 1.5) and a random sign.
    """
    if mode not in INITS:
        raise ValueError(f"unknown init {mode!r}; choose from {INITS}")
    if mode.startswith("skeleton"):
        init_skeleton_(topo)
    if mode == "skeleton_rescaled":
        rescale_hidden_units_(topo, random_unit_factors(topo, 1.0, torch.Generator().manual_seed(3)))
    if mode == "order_one":
        g = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for p in model.parameters():
                mag = torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.5
                sign = torch.randint(0, 2, p.shape, generator=g).to(p.dtype) * 2 - 1
                p.copy_(mag * sign)
