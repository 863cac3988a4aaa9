"""How much the S1+S2-rescaled starts of ``bn-invariance`` change the BN ResNet's function before training.

S1 (BatchNorm affine channels as hidden units) is an exact symmetry; S2 (rows of layers whose outputs
only go into training-mode BatchNorm) is one only up to BatchNorm's ``eps`` (1e-5), which a row
scaled by ``c`` sees as ``eps / c**2``. Per spread and seed this prints the largest change of the
training-mode logits on 256 training inputs (float64 copies), with ``eps = 1e-5`` and with
``eps = 1e-30``, relative to the largest logit, and writes them to ``<out>/start_difference.json``.

    PYTHONPATH=$PWD python -m experiments.study.bn_start_check --out results/study/bn-invariance
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from experiments.study.data import load_splits
from experiments.study.experiments import experiments
from experiments.study.harness import initial_model


def start_difference(spread: float, seed: int, eps: float) -> float:
    """max |logits(rescaled) - logits(plain)| / max |logits(plain)|, training mode, float64."""
    exp = experiments(epoch_scale=0.5)["bn-invariance"]
    base = dataclasses.replace(exp.settings[0].base, method="sgd", seed=seed, gsgd_kwargs=(("bn_mode", "exact"),))
    splits = load_splits(base.dataset)
    x = splits.x_train[:256].double()
    outs = []
    for s in (0.0, spread):
        model, _ = initial_model(dataclasses.replace(base, rescale_spread=s), splits)
        model.double().train()
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eps = eps
        with torch.no_grad():
            outs.append(model(x))
    return float((outs[1] - outs[0]).abs().max() / outs[0].abs().max())


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results/study/bn-invariance"))
    args = p.parse_args(argv)
    rows = []
    for spread in (1e-6, 1.0, 3.0):
        for seed in (1, 2, 3, 4, 5):
            row = {"spread": spread, "seed": seed}
            row |= {f"rel_change_eps_{e:g}": start_difference(spread, seed, e) for e in (1e-5, 1e-30)}
            rows.append(row)
            print(json.dumps(row))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "start_difference.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
