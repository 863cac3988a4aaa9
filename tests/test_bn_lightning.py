"""Exact BatchNorm segments through Lightning (issue 15): the callback detects them by default, a fit
equals GSGD driven by hand, a resume from a checkpoint is bit-identical, DDP keeps the replicas
identical, SyncBatchNorm is a BatchNorm, bf16-mixed runs."""

from __future__ import annotations

import pytest
import torch

from lightning_gsgd import GSGD, GSGDCallback
from tests import ddp_script
from tests.lightning_models import (
    BNModule,
    MixinBN,
    NoCollectivesInStep,
    SaveParams,
    clone,
    cpu_trainer,
    make_dataset,
    make_loader,
    train_by_hand,
)
from tests.test_ddp import clean_distributed  # noqa: F401  (a fixture)

HP = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)


def _params(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("residual", [False, True], ids=["mlp", "residual"])
def test_callback_detects_segments_and_fit_equals_by_hand(residual):
    """The default callback finds the BatchNorm channels (S1: both BatchNorms feed a Linear through ReLU;
    with a residual block, the stream's two BatchNorms are one unit per channel) and the normalized
    rows (S2: the Linears before BatchNorms), covers every parameter, and a 4-step fit equals GSGD
    driven by hand."""
    torch.manual_seed(0)
    model = BNModule(residual=residual, **HP)
    ref = clone(model)
    cb = GSGDCallback()
    trainer = cpu_trainer(max_steps=4, callbacks=[cb])
    trainer.fit(model, make_loader(make_dataset(), 8))
    topo = cb.topology
    s2 = 24 if residual else 16
    assert topo.s1_units == 16 and topo.s2_rows == s2
    tied = [n for c in topo.chains for layer in c.layers for n in layer.tied_names]
    assert tied == (["net.bn2.weight", "net.bn2.bias"] if residual else [])
    assert topo.coverage == 1.0
    assert isinstance(trainer.optimizers[0], GSGD)
    loader = make_loader(make_dataset(), 8)
    opt = train_by_hand(ref, list(loader)[:4], **HP)
    assert opt.topology.s2_rows == s2
    for name, p in _params(model).items():
        torch.testing.assert_close(p, dict(ref.named_parameters())[name].detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compiled"])
def test_resume_from_checkpoint_is_bit_identical(tmp_path, compiled):
    """Eight steps straight equal four (one epoch), a checkpoint, and four more from it (buffers in
    normalized coordinates, counters, BatchNorm running statistics), bit for bit."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    loader = make_loader(make_dataset(), 8)  # 4 batches per epoch

    def model(seed):
        torch.manual_seed(seed)
        return BNModule(**HP)

    straight = model(0)
    cpu_trainer(max_epochs=2, callbacks=[GSGDCallback(compiled=compiled)]).fit(straight, loader)
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    callbacks = [GSGDCallback(compiled=compiled), saver]
    cpu_trainer(max_epochs=1, callbacks=callbacks, enable_checkpointing=True).fit(model(0), loader)
    resumed = model(123)  # another init: only the checkpoint can make the runs agree
    trainer = cpu_trainer(max_epochs=2, callbacks=[GSGDCallback(compiled=compiled)])
    trainer.fit(resumed, loader, ckpt_path=tmp_path / "last.ckpt")
    for (n, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n
    assert int(trainer.optimizers[0].steps) == 8


@pytest.mark.parametrize("residual", [False, True], ids=["mlp", "residual"])
def test_ddp_replicas_identical(tmp_path, clean_distributed, residual):  # noqa: F811
    """Under DDP the replicas stay bit-identical (their BatchNorm statistics are per rank; DDP
    broadcasts the buffers) and the step adds no collective; with a residual stream too."""
    strategy = "ddp_spawn" if torch.cuda.is_initialized() else "ddp_fork"
    torch.manual_seed(ddp_script.SEED)
    model = BNModule(residual=residual, **HP)
    names = [n for n, _ in model.named_parameters()]
    callbacks = [GSGDCallback(), NoCollectivesInStep(), SaveParams(str(tmp_path))]
    trainer = cpu_trainer(strategy=strategy, devices=2, max_steps=ddp_script.STEPS, callbacks=callbacks)
    trainer.fit(model, make_loader(make_dataset(), ddp_script.PER_RANK_BATCH))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for name in names:
        assert torch.equal(rank0[name], rank1[name]), f"replicas differ in {name}"


def test_syncbatchnorm_is_a_batchnorm():
    """SyncBatchNorm gives the same segments as BatchNorm and, in one process (where it is
    BatchNorm), the same steps bit for bit. (Under DDP torch runs SyncBatchNorm on GPUs only.)"""
    torch.manual_seed(0)
    plain = BNModule(**HP)
    sync = BNModule(sync=True, **HP)
    sync.load_state_dict(plain.state_dict())
    batches = list(make_loader(make_dataset(), 8))[:3]
    a = train_by_hand(plain, batches, **HP)
    b = train_by_hand(sync, batches, **HP)
    assert b.topology.s1_units == a.topology.s1_units == 16 and b.topology.s2_rows == a.topology.s2_rows == 16
    for (n, p), q in zip(plain.named_parameters(), sync.parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("residual", [False, True], ids=["mlp", "residual"])
def test_bf16_mixed_fit_runs(residual):
    """bf16-mixed: the fit takes every step (none skipped) and changes the weights."""
    torch.manual_seed(0)
    model = BNModule(residual=residual, **HP)
    start = _params(model)
    trainer = cpu_trainer(max_steps=4, precision="bf16-mixed", callbacks=[GSGDCallback()])
    trainer.fit(model, make_loader(make_dataset(), 8))
    opt = trainer.optimizers[0]
    assert int(opt.steps) == 4 and int(opt.skipped_steps) == 0
    assert any(not torch.equal(p, start[n]) for n, p in _params(model).items())


def test_mixin_trains_bn_segments_exactly():
    """The mixin's callback uses the exact mode by default: the bound GSGD steps the S2 rows."""
    torch.manual_seed(0)
    model = MixinBN(**HP)
    trainer = cpu_trainer(max_steps=2)
    trainer.fit(model, make_loader(make_dataset(), 8))
    opt = trainer.optimizers[0]
    assert isinstance(opt, GSGD) and opt.topology.s2_rows == 16 and opt.topology.s1_units == 16
    assert int(opt.steps) == 2
