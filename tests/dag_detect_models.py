"""Small ReLU networks whose chains are DAGs (no BatchNorm), for detection and the self-check.

Pure torch: fan-out of one layer to several branches, concatenation of several producers, a
SqueezeNet Fire module, an Inception-style block, a DenseNet-style block, a ShuffleNet-V2-style unit
(chunk, branch, cat, channel shuffle). Unequal widths and a mix of layers with and without bias
throughout. Every model takes ``[N, 3, 6, 6]`` and returns ``[N, classes]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def image(n: int = 2, side: int = 6, seed: int = 0) -> torch.Tensor:
    """A float64 ``[n, 3, side, side]`` batch."""
    return torch.randn(n, 3, side, side, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


class FanOut(nn.Module):
    """stem -> ReLU -> ``k`` branches ``conv -> ReLU -> conv`` (widths 3, 5, 2); the branch outputs
    are concatenated (``join="cat"``: ReLU -> head conv) or added (``join="add"``: the model output)."""

    def __init__(self, k: int = 2, join: str = "cat") -> None:
        super().__init__()
        widths = [3, 5, 2][:k]
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.b1 = nn.ModuleList(nn.Conv2d(4, w, 3, padding=1) for w in widths)
        self.b2 = nn.ModuleList(nn.Conv2d(w, 5, 1, bias=i % 2 == 0) for i, w in enumerate(widths))
        self.join = join
        self.head = nn.Conv2d(5 * k, 3, 1) if join == "cat" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        outs = [c2(F.relu(c1(h))) for c1, c2 in zip(self.b1, self.b2)]
        if self.head is not None:
            return self.head(F.relu(torch.cat(outs, 1))).mean((2, 3))
        out = outs[0]
        for o in outs[1:]:
            out = out + o
        return out.mean((2, 3))


class ConcatTwo(nn.Module):
    """Two producers of the input, concatenated, feed one conv; then a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.p1, self.p2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 5, 1, bias=False)
        self.conv, self.fc = nn.Conv2d(9, 6, 3, padding=1), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([F.relu(self.p1(x)), F.relu(self.p2(x))], dim=1)
        return self.fc(F.relu(self.conv(h)).mean((2, 3)))


class Fire(nn.Module):
    """SqueezeNet's Fire module: squeeze 1x1 -> ReLU -> (expand 1x1, expand 3x3) -> ReLU -> cat."""

    def __init__(self, cin: int, squeeze: int, e1: int, e3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.e1, self.e3 = nn.Conv2d(squeeze, e1, 1), nn.Conv2d(squeeze, e3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.squeeze(x), inplace=True)
        return torch.cat([F.relu(self.e1(x)), F.relu(self.e3(x))], 1)


class FireNet(nn.Module):
    """SqueezeNet-like: stem, max-pool, two Fire modules, a 1x1 conv classifier, ReLU, average pool."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.fire1, self.fire2 = Fire(6, 3, 4, 5), Fire(9, 2, 3, 3)
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(6, 4, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.stem(x)), 2, ceil_mode=True)
        return torch.flatten(self.classifier(self.fire2(self.fire1(h))), 1)


class Inception(nn.Module):
    """An Inception-style block: 1x1; 1x1 -> 3x3; 1x1 -> 5x5; max-pool -> 1x1; ReLU each, cat."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.b1 = nn.Conv2d(6, 2, 1)
        self.b2a, self.b2b = nn.Conv2d(6, 3, 1), nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.b3a, self.b3b = nn.Conv2d(6, 2, 1), nn.Conv2d(2, 3, 5, padding=2)
        self.b4 = nn.Conv2d(6, 2, 1)
        self.head, self.fc = nn.Conv2d(11, 5, 1), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        parts = [
            self.b1(h),
            self.b2b(F.relu(self.b2a(h))),
            self.b3b(F.relu(self.b3a(h))),
            self.b4(F.max_pool2d(h, 3, 1, 1)),
        ]
        h = torch.cat([F.relu(p) for p in parts], 1)
        return self.fc(F.relu(self.head(h)).mean((2, 3)))


class DenseLayer(nn.Module):
    """DenseNet's layer without BatchNorm: ReLU(cat(previous)) -> 1x1 -> ReLU -> 3x3 (growth 2)."""

    def __init__(self, cin: int, growth: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, 4, 1, bias=False)
        self.conv2 = nn.Conv2d(4, growth, 3, padding=1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(F.relu(torch.cat(feats, 1)))))


class DenseBlock(nn.Module):
    """A DenseNet-style block without BatchNorm: each layer reads the cat of all previous outputs;
    then a 1x1 transition conv, average pooling and a Linear classifier."""

    def __init__(self, layers: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.layers = nn.ModuleList(DenseLayer(4 + 2 * k) for k in range(layers))
        self.transition = nn.Conv2d(4 + 2 * layers, 5, 1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [F.max_pool2d(F.relu(self.stem(x)), 2)]
        for layer in self.layers:
            feats.append(layer(feats))
        h = F.avg_pool2d(self.transition(F.relu(torch.cat(feats, 1))), 3)
        return self.fc(torch.flatten(F.relu(h), 1))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """torchvision's ShuffleNet-V2 channel shuffle: view, transpose, view back."""
    n, c, h, w = x.size()
    x = x.view(n, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(n, -1, h, w)


class ShuffleUnit(nn.Module):
    """A ShuffleNet-V2-style unit (without its depthwise conv and BatchNorm): chunk the stem's output
    in two, a branch on the second half, cat with the first half, channel shuffle, 1x1 head.

    ``shuffle``: ``"view"`` (torchvision's view-transpose-view), ``"module"`` (``nn.ChannelShuffle``)
    or ``"functional"`` (``F.channel_shuffle``).
    """

    def __init__(self, shuffle: str = "view") -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a, self.b = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.head = nn.Conv2d(8, 3, 1)
        self.shuffle = shuffle
        self.shuffler = nn.ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = F.relu(self.stem(x)).chunk(2, dim=1)
        out = torch.cat((x1, F.relu(self.b(F.relu(self.a(x2))))), dim=1)
        if self.shuffle == "view":
            out = channel_shuffle(out, 2)
        elif self.shuffle == "module":
            out = self.shuffler(out)
        else:
            out = F.channel_shuffle(out, 2)
        return self.head(out).mean((2, 3))


DAG_MODELS = {
    "fan_out_2_cat": lambda: FanOut(2, "cat"),
    "fan_out_3_cat": lambda: FanOut(3, "cat"),
    "fan_out_2_add": lambda: FanOut(2, "add"),
    "fan_out_3_add": lambda: FanOut(3, "add"),
    "concat_two": ConcatTwo,
    "fire": FireNet,
    "inception": Inception,
    "dense_block": DenseBlock,
    "shuffle_view": lambda: ShuffleUnit("view"),
    "shuffle_module": lambda: ShuffleUnit("module"),
    "shuffle_functional": lambda: ShuffleUnit("functional"),
}
