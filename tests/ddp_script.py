"""Real ``strategy="ddp"`` on 2 CPU processes, run by tests/test_ddp.py in a subprocess.

Lightning starts rank 1 by running this script again. Each rank writes its parameters to
``OUT/rank{r}.pt``. Usage: ``PYTHONPATH=<repo root> python tests/ddp_script.py OUT``.
"""

from __future__ import annotations

import sys

import torch

from lightning_gsgd import GSGDCallback
from tests.lightning_models import MLPModule, NoCollectivesInStep, SaveParams, cpu_trainer, make_dataset, make_loader

STEPS, PER_RANK_BATCH, SEED = 3, 4, 0


def main(out: str) -> None:
    torch.manual_seed(SEED)
    model = MLPModule(lr=0.05, momentum=0.9)
    guard = NoCollectivesInStep()
    trainer = cpu_trainer(
        strategy="ddp", devices=2, max_steps=STEPS, callbacks=[GSGDCallback(), guard, SaveParams(out)]
    )
    trainer.fit(model, make_loader(make_dataset(), PER_RANK_BATCH))
    assert guard.steps == STEPS, guard.steps


if __name__ == "__main__":
    main(sys.argv[1])
