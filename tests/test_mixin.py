"""GSGDMixin: G-SGD without a Trainer callback, for a GSGD or an SGD from configure_optimizers."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.tuner import Tuner

from lightning_gsgd import GSGD, GSGDCallback, GSGDMixin
from tests.lightning_models import MixinMLP, clone, cpu_trainer, make_dataset, make_loader, params_of, train_by_hand


@pytest.mark.parametrize("optimizer", ["gsgd", "sgd"])
def test_mixin_trains_with_gsgd_like_by_hand(optimizer):
    torch.manual_seed(0)
    model = MixinMLP(lr=0.05, momentum=0.9, optimizer=optimizer)
    ref = clone(model)
    loader = make_loader(make_dataset())
    trainer = cpu_trainer(max_steps=3)
    trainer.fit(model, loader)
    opt = trainer.optimizers[0]
    assert type(opt) is GSGD and opt.is_bound and int(opt.steps) == 3
    assert sum(isinstance(cb, GSGDCallback) for cb in trainer.callbacks) == 1
    train_by_hand(ref, list(loader)[:3], lr=0.05, momentum=0.9)
    for name, value in params_of(ref).items():
        assert torch.equal(params_of(model)[name], value), name


def test_trainer_callback_takes_precedence_over_the_mixins():
    model = MixinMLP(lr=0.5, optimizer="gsgd")
    callback = GSGDCallback(lr=0.01)
    trainer = cpu_trainer(max_steps=1, callbacks=[callback])
    trainer.fit(model, make_loader(make_dataset()))
    assert [cb for cb in trainer.callbacks if isinstance(cb, GSGDCallback)] == [callback]
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.01


def test_mixin_binds_gsgd_before_the_lr_finder_range_test():
    torch.manual_seed(1)
    model = MixinMLP(lr=0.05, optimizer="gsgd")
    trainer = cpu_trainer(max_epochs=1)
    finder = Tuner(trainer).lr_find(model, train_dataloaders=make_loader(make_dataset(64), 4), num_training=5)
    assert finder is not None and len(finder.results["loss"]) == 5


def test_mixin_must_come_before_lightning_module():
    with pytest.raises(TypeError, match=r"class Wrong\(GSGDMixin, LightningModule\)"):

        class Wrong(LightningModule, GSGDMixin):
            pass
