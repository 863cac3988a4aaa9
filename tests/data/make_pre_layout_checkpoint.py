"""Writes ``pre_layout.ckpt``: a Lightning checkpoint saved by the package before its subpackage layout.

Run once, on commit 5c53abf (the flat layout), from the repository root:
``PYTHONPATH=. python tests/data/make_pre_layout_checkpoint.py``. ``tests/test_pre_layout_checkpoint.py`` loads the
file with today's package and resumes from it; the file is committed so that the test keeps checking
a checkpoint written by the old code, not one written by the code under test.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lightning_gsgd import GSGDCallback
from tests.lightning_models import MLPModule, cpu_trainer, make_dataset, make_loader

HERE = Path(__file__).parent

if __name__ == "__main__":
    torch.manual_seed(0)
    model = MLPModule(lr=0.08, momentum=0.9, weight_decay=1e-3, scheduler="step")
    trainer = cpu_trainer(max_epochs=1, callbacks=[GSGDCallback()])
    trainer.fit(model, make_loader(make_dataset(), 8))
    trainer.save_checkpoint(HERE / "pre_layout.ckpt")
