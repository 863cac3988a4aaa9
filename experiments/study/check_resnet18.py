"""Checks ``models.ResNet18`` against torchvision's ``resnet18`` (same parameter shapes in the same order,
and the same function with the same weights, once torchvision's stem is replaced by the study's 3x3
stride-1 one-channel conv and its max-pool by the identity); prints the parameter counts.

torchvision is not a dependency of the project (its CUDA wheel breaks ``import lightning`` in the main
venv); run this with a Python that has it, from the repository root:

    PYTHONPATH=$PWD /work/scratch_timm/.venv/bin/python -m experiments.study.check_resnet18
"""

from __future__ import annotations

import torch
from torch import nn

from experiments.study.models import ResNet18


def _import_torchvision():
    # the scratch venv's torchvision wheel has C ops built for another torch; the model code is pure Python
    register = torch.library.register_fake
    torch.library.register_fake = lambda *a, **k: lambda f: f
    try:
        import torchvision
    finally:
        torch.library.register_fake = register
    return torchvision


def main() -> None:
    """Print the comparison."""
    tv = _import_torchvision()
    ref = tv.models.resnet18(num_classes=10)
    n_ref = sum(p.numel() for p in ref.parameters())
    print(f"torchvision {tv.__version__} resnet18(num_classes=10): {n_ref} parameters")
    ref.conv1, ref.maxpool = nn.Conv2d(1, 64, 3, 1, 1, bias=False), nn.Identity()
    ours = ResNet18(784, 10, width=64)
    same = [tuple(p.shape) for p in ref.parameters()] == [tuple(p.shape) for p in ours.parameters()]
    print(f"  with a 3x3 stride-1 1-channel stem and no max-pool: {sum(p.numel() for p in ref.parameters())}")
    print(f"study ResNet18(width=64): {sum(p.numel() for p in ours.parameters())}; same shapes in order: {same}")
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(8, 784, generator=torch.Generator().manual_seed(0))
    diff = (ref(x.view(8, 1, 28, 28)) - ours(x)).abs().max().item()
    print(f"  same weights, train mode, 8 inputs: max |output difference| = {diff:.3g}")
    for w in (16, 8):
        print(f"study ResNet18(width={w}): {sum(p.numel() for p in ResNet18(784, 10, width=w).parameters())}")


if __name__ == "__main__":
    main()
