"""A DAG chain through Lightning: the callback detects it, converts SGD (and Adam), and an interrupted
fit resumed from its checkpoint ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn

from lightning_gsgd import GSGD, GAdam, GSGDCallback
from tests.lightning_models import N_IN, N_OUT, MLPModule, cpu_trainer, make_dataset, make_loader, params_of


class FanOutNet(nn.Module):
    """One hidden layer read by two branches whose outputs are concatenated into the output layer."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.a, self.b = nn.Linear(N_IN, 8), nn.Linear(8, 6), nn.Linear(8, 5)
        self.out = nn.Linear(11, N_OUT)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.l1(x))
        return self.out(torch.cat([F.relu(self.a(h)), F.relu(self.b(h))], 1))


class FanOutModule(MLPModule):
    def build_net(self, hidden: int) -> nn.Module:
        return FanOutNet()


def _model(seed: int, **kwargs) -> FanOutModule:
    torch.manual_seed(seed)
    return FanOutModule(**kwargs)


def test_dag_fit_resumes_bit_identical(tmp_path):
    loader = make_loader(make_dataset(), 8)
    hp = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, scheduler="step")
    full = _model(0, **hp)
    callback = GSGDCallback()
    trainer = cpu_trainer(max_epochs=2, callbacks=[callback])
    trainer.fit(full, loader)
    opt = trainer.optimizers[0]
    assert isinstance(opt, GSGD) and opt.topology is not None
    (chain,) = opt.topology.chains
    assert not chain.is_sequence and chain.hidden == (True, True, True, False)
    assert opt.topology.coverage == 1.0

    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    first = _model(0, **hp)
    cpu_trainer(max_epochs=1, callbacks=[GSGDCallback(), saver], enable_checkpointing=True).fit(first, loader)
    resumed = _model(123, **hp)
    cpu_trainer(max_epochs=2, callbacks=[GSGDCallback()]).fit(resumed, loader, ckpt_path=tmp_path / "last.ckpt")
    want, got = params_of(full), params_of(resumed)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_dag_fit_converts_adam():
    model = _model(1, lr=1e-2, optimizer="adam")
    trainer = cpu_trainer(max_steps=4, callbacks=[GSGDCallback()])
    before = {k: v.clone() for k, v in params_of(model).items()}
    trainer.fit(model, make_loader(make_dataset(), 8))
    opt = trainer.optimizers[0]
    assert isinstance(opt, GAdam) and int(opt.steps) == 4
    assert not opt.topology.chains[0].is_sequence
    assert any(not torch.equal(before[k], v) for k, v in params_of(model).items())
