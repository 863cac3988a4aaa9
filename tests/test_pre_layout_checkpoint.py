"""A checkpoint written before the subpackage layout (``tests/data/pre_layout.ckpt``) still loads and resumes."""

from __future__ import annotations

from pathlib import Path

import torch

from lightning_gsgd import GSGD, GSGDCallback
from tests.lightning_models import MLPModule, cpu_trainer, make_dataset, make_loader, params_of

CKPT = Path(__file__).parent / "data" / "pre_layout.ckpt"


def _model(seed: int) -> MLPModule:
    torch.manual_seed(seed)
    return MLPModule(lr=0.08, momentum=0.9, weight_decay=1e-3, scheduler="step")


def test_pre_layout_checkpoint_holds_no_pickled_package_object():
    ckpt = torch.load(CKPT, weights_only=True)  # refuses any pickled class, ours included
    assert "gsgd" in ckpt["optimizer_states"][0]
    assert any(k.startswith("GSGDCallback") for k in ckpt["callbacks"])


def test_pre_layout_checkpoint_resumes_as_an_uninterrupted_fit():
    loader = make_loader(make_dataset(), 8)  # the generator's data: 4 batches an epoch, no shuffle
    full = _model(0)
    cpu_trainer(max_epochs=2, callbacks=[GSGDCallback()]).fit(full, loader)

    resumed = _model(123)  # another init: only the checkpoint can make the runs agree
    trainer = cpu_trainer(max_epochs=2, callbacks=[GSGDCallback()])
    trainer.fit(resumed, loader, ckpt_path=CKPT)

    want, got = params_of(full), params_of(resumed)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    opt = trainer.optimizers[0]
    assert isinstance(opt, GSGD) and opt.steps == 8 and trainer.global_step == 8
