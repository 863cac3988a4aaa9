"""Checkpoints: an interrupted fit resumed from ``ckpt_path`` ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_gsgd import GSGD, GSGDCallback
from tests.lightning_models import MLPModule, cpu_trainer, make_dataset, make_loader, params_of


def _model(seed: int) -> MLPModule:
    torch.manual_seed(seed)
    return MLPModule(lr=0.08, momentum=0.9, weight_decay=1e-3, scheduler="step")


def test_resume_from_checkpoint_is_bit_identical(tmp_path):
    loader = make_loader(make_dataset(), 8)  # 4 batches per epoch, shuffle=False

    full = _model(0)
    cpu_trainer(max_epochs=2, callbacks=[GSGDCallback()]).fit(full, loader)

    first = _model(0)
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    cpu_trainer(max_epochs=1, callbacks=[GSGDCallback(), saver], enable_checkpointing=True).fit(first, loader)
    last = tmp_path / "last.ckpt"
    assert last.exists()

    # Another initialization, so that only the checkpoint can make the runs agree; a re-applied
    # skeleton init or lost momentum buffers, counters or scheduler state would show.
    resumed = _model(123)
    callback = GSGDCallback()
    trainer = cpu_trainer(max_epochs=2, callbacks=[callback])
    trainer.fit(resumed, loader, ckpt_path=last)

    want, got = params_of(full), params_of(resumed)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    opt = trainer.optimizers[0]
    assert isinstance(opt, GSGD) and int(opt.steps) == 8 and trainer.global_step == 8
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is opt
    assert opt.param_groups[0]["lr"] == 0.08 * 0.5**4


def test_checkpoint_loads_with_weights_only_and_callback_state_is_small(tmp_path):
    model = _model(1)
    trainer = cpu_trainer(max_steps=2, callbacks=[GSGDCallback()])
    trainer.fit(model, make_loader(make_dataset()))
    path = tmp_path / "x.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("GSGDCallback")]
    assert state["skeleton_done"] is True and state["version"] == 1
    assert [name for name, _ in state["fingerprint"]] == [
        f"net.{i}.{kind}" for i in (0, 2, 4) for kind in ("weight", "bias")
    ]
    assert "gsgd" in ckpt["optimizer_states"][0]


def test_resume_never_reapplies_the_skeleton_even_without_callback_state(tmp_path):
    """A checkpoint from plain SGD (no momentum, no GSGDCallback state): resuming keeps its weights."""
    torch.manual_seed(2)
    model = MLPModule(lr=0.1)
    trainer = cpu_trainer(max_steps=2)
    trainer.fit(model, make_loader(make_dataset()))
    path = tmp_path / "sgd.ckpt"
    trainer.save_checkpoint(path)
    saved = params_of(model)

    resumed = MLPModule(lr=0.1)
    cpu_trainer(max_steps=2, callbacks=[GSGDCallback()]).fit(resumed, make_loader(make_dataset()), ckpt_path=path)
    for name, value in params_of(resumed).items():  # max_steps already reached: on_fit_start only
        assert torch.equal(value, saved[name]), name


def test_a_second_fit_with_the_same_callback_keeps_the_trained_skeleton():
    torch.manual_seed(3)
    model = MLPModule(lr=0.1)
    trainer = cpu_trainer(max_steps=3, callbacks=[GSGDCallback()])
    trainer.fit(model, make_loader(make_dataset()))
    trained = params_of(model)
    trainer.fit(model, make_loader(make_dataset()))  # max_steps already reached: on_fit_start only
    for name, value in params_of(model).items():
        assert torch.equal(value, trained[name]), name
