"""Time detect_topology (+ self-check) on a ResNet-50-sized model built here (no torchvision).

Run from the repository root:

    PYTHONPATH=$PWD python benchmarks/detect_bench.py [--repeats 5] [--size 224] [--batch 1]

Prints one table row per variant (best and median wall time of ``--repeats`` runs, and the best
CPU time of the process over all its threads) with the
machine, torch version, thread count and ``os.getloadavg()`` before and after, because this
machine is shared and a concurrent job changes the numbers. Target (issue 3): detection plus
self-check <= 2 s for the ~25M-parameter model.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from lightning_gsgd import detect_topology


class Bottleneck(nn.Module):
    """ResNet-50 bottleneck: 1x1 -> 3x3 (stride) -> 1x1 (x4), projection shortcut when needed."""

    def __init__(self, cin: int, width: int, stride: int, bn: bool) -> None:
        super().__init__()
        cout = 4 * width
        norm = nn.BatchNorm2d if bn else (lambda c: nn.Identity())
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=not bn), norm(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=not bn), norm(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=not bn), norm(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=not bn), norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNet50(nn.Module):
    """The ResNet-50 architecture (3-4-6-3 bottlenecks, 1000 classes): 25.6M parameters with BN."""

    def __init__(self, bn: bool = True, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=not bn)
        self.bn1 = nn.BatchNorm2d(64) if bn else nn.Identity()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin, stages = 64, []
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            layers = []
            for b in range(blocks):
                layers.append(Bottleneck(cin, width, stride if b == 0 else 1, bn))
                cin = 4 * width
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _time(fn, repeats: int) -> tuple[float, float, float, object]:
    """Best and median wall time, best CPU time of this process (all threads), last result."""
    times, cpu, out = [], [], None
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return min(times), statistics.median(times), min(cpu), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    load_before = os.getloadavg()
    print(f"machine: {platform.node()} {platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, input {tuple(x.shape)} float32")
    print(f"loadavg before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")
    header = f"{'variant':46s} {'params':>10s} {'chains':>6s} {'bn':>4s} {'cover':>6s} "
    header += f"{'best s':>7s} {'median s':>8s} {'cpu s':>6s}"
    print(header)
    print("-" * len(header))
    variants = [
        ("forward only (reference)", True, None),
        ("ResNet-50 no BN, detect + self-check", False, dict()),
        ("ResNet-50 no BN, detect, no self-check", False, dict(self_check=False)),
        ("ResNet-50 no BN, recorder + self-check", False, dict(method="record")),
        ("ResNet-50 BN, detect (default bn_mode)", True, dict(allow_empty=True)),
        ("ResNet-50 BN, detect (authors_heuristic)", True, dict(bn_mode="authors_heuristic")),
    ]
    for label, bn, kw in variants:
        model = ResNet50(bn=bn)
        n = sum(p.numel() for p in model.parameters())
        if kw is None:
            model.eval()

            def run(model=model):
                with torch.no_grad():
                    return model(x)

            best, med, cpu, _ = _time(run, args.repeats)
            print(f"{label:46s} {n:10d} {'':>6s} {'':>4s} {'':>6s} {best:7.3f} {med:8.3f} {cpu:6.3f}")
            continue
        best, med, cpu, topo = _time(lambda model=model, kw=kw: detect_topology(model, x, **kw), args.repeats)
        print(
            f"{label:46s} {n:10d} {len(topo.chains):6d} {len(topo.bn_layers):4d} "
            f"{100 * topo.coverage:5.1f}% {best:7.3f} {med:8.3f} {cpu:6.3f}"
        )
    load_after = os.getloadavg()
    print(f"loadavg after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")


if __name__ == "__main__":
    main()
