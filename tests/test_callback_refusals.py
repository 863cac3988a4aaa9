"""Every set-up GSGDCallback refuses is refused early, with one sentence that names the fix."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    SingleDeviceXLAStrategy,
    Strategy,
    XLAStrategy,
)
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, IterableDataset

from lightning_gsgd import GSGD, GSGDCallback, TopologyError
from lightning_gsgd.lightning.checks import check_strategy
from tests.lightning_models import ManualModule, MLPModule, TanhModule, cpu_trainer, make_dataset, make_loader


def _bare(cls: type) -> Strategy:
    """An instance for isinstance checks only (several strategies need optional packages to construct)."""
    return object.__new__(cls)


@pytest.mark.parametrize(
    ("cls", "fix"),
    [
        (FSDPStrategy, "use ModelParallelStrategy"),
        (DeepSpeedStrategy, "use ModelParallelStrategy"),  # a DDPStrategy subclass: the deny-list comes first
        (XLAStrategy, "accelerator='cpu'"),  # also a DDPStrategy subclass
        (SingleDeviceXLAStrategy, "accelerator='cpu'"),  # a SingleDeviceStrategy subclass
    ],
)
def test_sharded_and_xla_strategies_are_refused(cls, fix):
    with pytest.raises(MisconfigurationException, match="GSGDCallback does not support") as info:
        check_strategy(_bare(cls))
    assert fix in str(info.value)


def test_post_local_sgd_is_refused():
    from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import PostLocalSGDState

    state = PostLocalSGDState(process_group=None, subgroup=None, start_localSGD_iter=1)
    with pytest.raises(MisconfigurationException, match="post-local SGD.*drop the ddp_comm_state"):
        check_strategy(DDPStrategy(ddp_comm_state=state, model_averaging_period=2))


def test_unknown_strategies_are_refused_and_ddp_is_accepted():
    class Custom(Strategy):
        pass

    Custom.__abstractmethods__ = frozenset()
    with pytest.raises(MisconfigurationException, match="single-device, DDP and ModelParallelStrategy.*strategy='ddp'"):
        check_strategy(Custom())
    check_strategy(DDPStrategy())
    check_strategy(SingleDeviceStrategy(device=torch.device("cpu")))


class _Mesh:
    def __init__(self, tp: int) -> None:
        self.tp = tp

    def __getitem__(self, name: str) -> Any:
        return type("Sub", (), {"size": lambda _self: self.tp if name == "tensor_parallel" else 2})()


@pytest.mark.parametrize("tp", [1, 2])
def test_model_parallel_is_accepted_with_fsdp2_only(tp):
    strategy = _bare(ModelParallelStrategy)
    strategy._device_mesh = _Mesh(tp)
    if tp == 1:
        check_strategy(strategy)
    else:
        with pytest.raises(MisconfigurationException, match="FSDP2 only.*tensor_parallel_size=1"):
            check_strategy(strategy)


def _fit(model, callback=None, loader=None, **kw):
    trainer = cpu_trainer(max_steps=2, callbacks=[callback or GSGDCallback()], **kw)
    trainer.fit(model, loader if loader is not None else make_loader(make_dataset()))
    return trainer


def test_manual_optimization_is_refused():
    with pytest.raises(MisconfigurationException, match="automatic_optimization.*set it to True"):
        _fit(ManualModule())


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("none", "found no optimizer.*return torch.optim.SGD"),
        ("sgd_maximize", "maximize=True.*minimize the negated objective"),
    ],
)
def test_unsupported_optimizers_are_refused(kind, match):
    with pytest.raises(MisconfigurationException, match=match):
        _fit(MLPModule(optimizer=kind))


def test_lr_override_with_a_scheduler_is_refused():
    with pytest.raises(MisconfigurationException, match="set lr where the optimizer is built"):
        _fit(MLPModule(scheduler="lambda"), GSGDCallback(lr=0.1))


def test_model_without_relu_chain_is_an_error():
    with pytest.raises(TopologyError, match="no ReLU chain in TanhModule.*allow_empty=True"):
        _fit(TanhModule())


def test_model_without_relu_chain_warns_when_allowed_and_runs_plain_sgd():
    torch.manual_seed(0)
    model = TanhModule(lr=0.1)
    ref = TanhModule(lr=0.1)
    ref.load_state_dict(model.state_dict())
    with pytest.warns(UserWarning, match="no ReLU chain in TanhModule"):
        trainer = _fit(model, GSGDCallback(allow_empty=True))
    assert isinstance(trainer.optimizers[0], GSGD) and not trainer.optimizers[0].topology.chains
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1)
    for i, batch in enumerate(list(make_loader(make_dataset()))[:2]):
        sgd.zero_grad()
        ref.training_step(batch, i).backward()
        sgd.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)


def test_coverage_below_min_coverage_is_an_error():
    with pytest.raises(TopologyError, match="below min_coverage=1.0; lower min_coverage"):
        _fit(MixedModule(), GSGDCallback(min_coverage=1.0))


class MixedModule(MLPModule):
    """A ReLU chain followed by a tanh head: part of the parameters lie outside chains."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
        )


class Stream(IterableDataset):
    def __iter__(self):
        data = make_dataset()
        return iter([(data.tensors[0][i], data.tensors[1][i]) for i in range(len(data))])


def test_iterable_dataset_without_example_input_is_an_error():
    with pytest.raises(MisconfigurationException, match="IterableDataset.*example_input_array"):
        _fit(MLPModule(example=False), loader=DataLoader(Stream(), batch_size=8))


def test_resuming_from_another_optimizers_momentum_is_refused(tmp_path):
    model = MLPModule(momentum=0.9)
    trainer = cpu_trainer(max_steps=2)
    trainer.fit(model, make_loader(make_dataset()))
    path = tmp_path / "sgd.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(MisconfigurationException, match="not saved by GSGD.*skeleton_init=False"):
        trainer = cpu_trainer(max_steps=4, callbacks=[GSGDCallback()])
        trainer.fit(MLPModule(momentum=0.9), make_loader(make_dataset()), ckpt_path=path)


def test_checkpoint_for_other_chains_is_refused():
    callback = GSGDCallback()
    callback.load_state_dict({"version": 1, "skeleton_done": True, "fingerprint": [["net.9.weight", [1, 1]]]})
    with pytest.raises(TopologyError, match="other ReLU chains.*resume with the same model"):
        _fit(MLPModule(), callback)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": -1.0},
        {"momentum": -0.1},
        {"weight_decay": -1.0},
        {"min_ratio": 1.0},
        {"min_coverage": 1.5},
        {"bn_mode": "x"},
    ],
)
def test_invalid_arguments_are_refused(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        GSGDCallback(**kwargs)
