"""Exact BatchNorm segments through Lightning (issue 15): the callback detects them by default, a fit
equals GSGD driven by hand, a resume from a checkpoint is bit-identical, DDP keeps the replicas
identical (SyncBatchNorm: equal to one process on the global batch), bf16-mixed runs."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from lightning_gsgd import GSGD, GSGDCallback
from tests import ddp_script
from tests.lightning_models import (
    BNModule,
    NoCollectivesInStep,
    SaveParams,
    clone,
    cpu_trainer,
    make_dataset,
    make_loader,
    train_by_hand,
)
from tests.test_ddp import _global_batches, clean_distributed  # noqa: F401  (a fixture)

HP = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)


def _params(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_callback_detects_segments_and_fit_equals_by_hand():
    """The default callback finds the BatchNorm channels (S1: both BatchNorms feed a Linear through ReLU)
    and the normalized rows (S2: the first two Linears), covers every parameter, and a 4-step fit
    equals GSGD driven by hand."""
    torch.manual_seed(0)
    model = BNModule(**HP)
    ref = clone(model)
    cb = GSGDCallback()
    trainer = cpu_trainer(max_steps=4, callbacks=[cb])
    trainer.fit(model, make_loader(make_dataset(), 8))
    topo = cb.topology
    assert topo.s1_units == 16 and topo.s2_rows == 16
    assert topo.coverage == 1.0
    assert isinstance(trainer.optimizers[0], GSGD)
    loader = make_loader(make_dataset(), 8)
    opt = train_by_hand(ref, list(loader)[:4], **HP)
    assert opt.topology.s2_rows == 16
    for name, p in _params(model).items():
        torch.testing.assert_close(p, dict(ref.named_parameters())[name].detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_resume_from_checkpoint_is_bit_identical(tmp_path, compiled):
    """Six steps straight equal three, a checkpoint, and three more from it (buffers in normalized
    coordinates, counters, BatchNorm running statistics), bit for bit."""
    data = make_dataset()

    def fit(steps, ckpt=None, save=None):
        torch.manual_seed(0)
        model = BNModule(**HP)
        trainer = cpu_trainer(max_steps=steps, callbacks=[GSGDCallback(compiled=compiled)])
        trainer.fit(model, make_loader(data, 8), ckpt_path=ckpt)
        if save:
            trainer.save_checkpoint(save)
        return model, trainer

    straight, _ = fit(6)
    fit(3, save=str(tmp_path / "half.ckpt"))
    resumed, trainer = fit(6, ckpt=str(tmp_path / "half.ckpt"))
    for (n, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n
    assert int(trainer.optimizers[0].steps) == 6


@pytest.mark.parametrize("sync", [False, True], ids=["batchnorm", "syncbatchnorm"])
def test_ddp_replicas_identical(tmp_path, clean_distributed, sync):  # noqa: F811
    """Under DDP the replicas stay bit-identical and the step adds no collective; with SyncBatchNorm
    (statistics over the global batch) the result equals one process on the global batch."""
    strategy = "ddp_spawn" if torch.cuda.is_initialized() else "ddp_fork"
    torch.manual_seed(ddp_script.SEED)
    model = BNModule(sync=sync, **HP)
    ref = clone(model)
    callbacks = [GSGDCallback(), NoCollectivesInStep(), SaveParams(str(tmp_path))]
    trainer = cpu_trainer(strategy=strategy, devices=2, max_steps=ddp_script.STEPS, callbacks=callbacks)
    trainer.fit(model, make_loader(make_dataset(), ddp_script.PER_RANK_BATCH))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    names = [n for n, _ in ref.named_parameters()]
    for name in names:
        assert torch.equal(rank0[name], rank1[name]), f"replicas differ in {name}"
    if sync:
        if dist.is_initialized():
            dist.destroy_process_group()
        plain = BNModule(sync=False, **HP)
        plain.load_state_dict(ref.state_dict())
        train_by_hand(plain, _global_batches(int(os.environ.get("PL_GLOBAL_SEED", 0))), **HP)
        for name, p in plain.named_parameters():
            torch.testing.assert_close(rank0[name], p.detach(), rtol=1e-5, atol=1e-6)


def test_bf16_mixed_fit_runs():
    """bf16-mixed: the fit takes every step (none skipped) and changes the weights."""
    torch.manual_seed(0)
    model = BNModule(**HP)
    start = _params(model)
    trainer = cpu_trainer(max_steps=4, precision="bf16-mixed", callbacks=[GSGDCallback()])
    trainer.fit(model, make_loader(make_dataset(), 8))
    opt = trainer.optimizers[0]
    assert int(opt.steps) == 4 and int(opt.skipped_steps) == 0
    assert any(not torch.equal(p, start[n]) for n, p in _params(model).items())
