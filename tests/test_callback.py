"""GSGDCallback on one CPU: the Trainer's run equals GSGD driven by hand, in every supported set-up."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.tuner import Tuner

from lightning_gsgd import GSGD, GSGDCallback
from tests.lightning_models import (
    MLPModule,
    clone,
    cpu_trainer,
    make_dataset,
    make_loader,
    params_of,
    train_by_hand,
)


def _assert_same(model: torch.nn.Module, ref: torch.nn.Module) -> None:
    got, want = params_of(model), params_of(ref)
    assert got.keys() == want.keys()
    for name in got:
        assert torch.equal(got[name], want[name]), f"{name} differs by {(got[name] - want[name]).abs().max()}"


def _fit(model: MLPModule, steps: int, callback: GSGDCallback | None = None, batch_size: int = 8, **trainer_kw):
    loader = make_loader(make_dataset(), batch_size)
    trainer = cpu_trainer(max_steps=steps, callbacks=[callback or GSGDCallback()], **trainer_kw)
    trainer.fit(model, loader)
    return trainer, list(loader) * 4  # shuffle=False: every epoch repeats the same batches


def test_callback_equals_gsgd_by_hand():
    torch.manual_seed(0)
    model = MLPModule(lr=0.05, momentum=0.9, weight_decay=1e-3)
    ref, start = clone(model), params_of(model)
    trainer, batches = _fit(model, steps=4)
    opt = trainer.optimizers[0]
    assert type(opt) is GSGD and opt.is_bound and int(opt.steps) == 4
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["weight_decay"] == 1e-3
    train_by_hand(ref, batches[:4], lr=0.05, momentum=0.9, weight_decay=1e-3)
    _assert_same(model, ref)
    assert not torch.equal(params_of(model)["net.2.weight"], start["net.2.weight"])


def test_callback_overrides_hyper_parameters():
    torch.manual_seed(1)
    model = MLPModule(lr=0.5, momentum=0.0)
    ref = clone(model)
    trainer, batches = _fit(model, steps=3, callback=GSGDCallback(lr=0.03, momentum=0.8, min_ratio=0.05))
    group = trainer.optimizers[0].param_groups[0]
    assert (group["lr"], group["momentum"], group["min_ratio"]) == (0.03, 0.8, 0.05)
    train_by_hand(ref, batches[:3], lr=0.03, momentum=0.8)
    _assert_same(model, ref)


def test_skeleton_init_only_when_asked():
    torch.manual_seed(2)
    model = MLPModule()
    start = params_of(model)
    _fit(model, steps=0, callback=GSGDCallback(skeleton_init=False))  # max_steps=0: on_fit_start only
    for name, value in params_of(model).items():
        assert torch.equal(value, start[name]), name
    callback = GSGDCallback()
    _fit(model, steps=0, callback=callback)
    w = model.net[2].weight
    assert torch.equal(torch.diagonal(w), torch.ones(8))  # equal widths: sigma and tau are the diagonal
    assert not torch.equal(w, start["net.2.weight"])
    assert torch.equal(model.net[2].bias, start["net.2.bias"])


def test_gradient_accumulation_takes_one_step_per_window():
    torch.manual_seed(3)
    model = MLPModule(lr=0.05, momentum=0.9)
    ref = clone(model)
    trainer, batches = _fit(model, steps=2, accumulate_grad_batches=2)
    assert int(trainer.optimizers[0].steps) == 2 and trainer.global_step == 2
    train_by_hand(ref, batches[:4], lr=0.05, momentum=0.9, accumulate=2)
    _assert_same(model, ref)


def test_gradient_clipping_applies_before_the_gsgd_step():
    torch.manual_seed(4)
    model = MLPModule(lr=0.05)
    ref = clone(model)
    _, batches = _fit(model, steps=3, gradient_clip_val=0.05, gradient_clip_algorithm="norm")
    train_by_hand(ref, batches[:3], lr=0.05, clip_norm=0.05)
    _assert_same(model, ref)


def test_lr_scheduler_stays_attached(recwarn):
    torch.manual_seed(5)
    model = MLPModule(lr=0.08, momentum=0.5, scheduler="step")
    ref = clone(model)
    trainer, batches = _fit(model, steps=5)
    opt = trainer.optimizers[0]
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is opt
    assert opt.param_groups[0]["lr"] == pytest.approx(0.08 * 0.5**2)  # StepLR(step_size=2) after 5 steps
    assert not [w for w in recwarn.list if "lr_scheduler" in str(w.message) or "overridden" in str(w.message)]
    ref_opt = train_by_hand(ref, [], lr=0.08, momentum=0.5)
    sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=2, gamma=0.5)
    for i, batch in enumerate(batches[:5]):
        ref_opt.zero_grad()
        ref.training_step(batch, i).backward()
        ref_opt.step()
        sched.step()
    _assert_same(model, ref)


def test_bf16_mixed_on_cpu_equals_autocast_by_hand():
    torch.manual_seed(6)
    model = MLPModule(lr=0.05, momentum=0.9, example=False)  # detection and its self-check on real data
    ref = clone(model)
    ref.example_input_array = make_dataset().tensors[0][:8]
    _, batches = _fit(model, steps=3, precision="bf16-mixed")
    train_by_hand(ref, batches[:3], lr=0.05, momentum=0.9, autocast_bf16=True)
    _assert_same(model, ref)


def test_gsgd_from_configure_optimizers_is_bound():
    torch.manual_seed(7)
    model = MLPModule(lr=0.05, momentum=0.9, optimizer="gsgd")
    ref = clone(model)
    trainer, batches = _fit(model, steps=3)
    assert trainer.optimizers[0].is_bound
    train_by_hand(ref, batches[:3], lr=0.05, momentum=0.9)
    _assert_same(model, ref)


def test_detection_options_reach_detect_topology():
    trainer, _ = _fit(MLPModule(), steps=1, callback=GSGDCallback(exclude=["net.4"], self_check=False))
    topology = trainer.optimizers[0].topology
    assert [layer.name for chain in topology.chains for layer in chain.layers] == ["net.0", "net.2"]
    assert {e.name for e in topology.excluded} == {"net.4.weight", "net.4.bias"}


def test_frozen_layers_stay_out_of_the_chains_and_unchanged():
    torch.manual_seed(11)
    model = MLPModule(lr=0.05)
    model.net[0].requires_grad_(False)
    frozen = params_of(model)["net.0.weight"]
    trainer, _ = _fit(model, steps=2)
    topology = trainer.optimizers[0].topology
    assert [layer.name for chain in topology.chains for layer in chain.layers] == ["net.2", "net.4"]
    assert torch.equal(model.net[0].weight, frozen)


def test_importing_the_package_does_not_import_lightning():
    code = "import sys, lightning_gsgd; assert not any(m.split('.')[0] == 'lightning' for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1], timeout=120)


def test_unbound_gsgd_without_callback_says_how_to_bind():
    model = MLPModule(optimizer="gsgd")
    trainer = cpu_trainer(max_steps=1)
    with pytest.raises(RuntimeError, match=r"GSGDCallback\(\).*GSGDMixin"):
        trainer.fit(model, make_loader(make_dataset()))


def test_example_input_from_the_first_training_batch():
    torch.manual_seed(8)
    model = MLPModule(lr=0.05, example=False)
    assert model.example_input_array is None
    ref = clone(model)
    ref.example_input_array = torch.zeros(2, 4)
    trainer, batches = _fit(model, steps=2)
    assert trainer.optimizers[0].topology.hidden_units == 16
    train_by_hand(ref, batches[:2], lr=0.05)
    _assert_same(model, ref)


def test_lr_finder_searches_with_bound_gsgd_after_skeleton_init():
    """The range test must run G-SGD; the LR finder's own on_fit_start comes before the callback's."""
    torch.manual_seed(9)
    model = RecordingMLP(lr=0.05, example=False)  # the example input comes from the data, before the finder
    callback = GSGDCallback()
    trainer = cpu_trainer(max_epochs=1, callbacks=[callback])
    loader = make_loader(make_dataset(64), 4)
    finder = Tuner(trainer).lr_find(model, train_dataloaders=loader, num_training=6, min_lr=1e-3, max_lr=0.1)
    assert finder is not None and len(finder.results["lr"]) > 0
    assert model.seen and set(model.seen) == {"GSGD"}
    assert callback.topology is not None and callback._skeleton_done
    after_finder = params_of(model)
    model.seen.clear()
    trainer.fit(model, loader)  # the real fit: the skeleton is not re-applied, the finder's weights are restored
    assert set(model.seen) == {"GSGD"} and int(trainer.optimizers[0].steps) == len(loader)
    assert not torch.equal(after_finder["net.2.weight"], params_of(model)["net.2.weight"])


class RecordingMLP(MLPModule):
    """Records the optimizer class of every step (the LR finder's range test included)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen: list[str] = []

    def on_before_optimizer_step(self, optimizer) -> None:
        self.seen.append(type(optimizer).__name__)
        if isinstance(optimizer, GSGD):
            assert optimizer.is_bound


def test_on_gsgd_step_runs_once_per_optimizer_step():
    class Counting(GSGDCallback):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[int] = []

        def on_gsgd_step(self, trainer, pl_module) -> None:
            self.calls.append(trainer.global_step)

    callback = Counting()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _fit(MLPModule(), steps=3, callback=callback, accumulate_grad_batches=2)
    assert callback.calls == [1, 2, 3]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="16-mixed with a GradScaler needs CUDA")
def test_16_mixed_gradscaler_skipped_steps_are_not_counted():
    torch.manual_seed(10)
    model = InfAtSecondBatch(lr=0.05)
    scales: list[float] = []

    class Scale(GSGDCallback):
        def on_gsgd_step(self, trainer, pl_module) -> None:
            scales.append(trainer.precision_plugin.scaler.get_scale())

    loader = make_loader(make_dataset(), 8)
    trainer = cpu_trainer(
        accelerator="gpu", precision="16-mixed", max_steps=4, deterministic=False, callbacks=[Scale()]
    )
    trainer.fit(model, loader)
    opt = trainer.optimizers[0]
    start = 2.0**16  # GradScaler's default initial scale
    skipped = sum(b < a for a, b in zip([start] + scales[:-1], scales))
    assert skipped >= 1  # the injected inf at least
    assert int(opt.steps) == trainer.global_step - skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())


class InfAtSecondBatch(MLPModule):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if batch_idx == 1 else loss


class BatchShapedMLP(MLPModule):
    """Reshapes by the batch size, so a single sample without its batch dimension cannot pass."""

    def forward(self, x):
        return self.net(x.view(x.shape[0], 2, -1).flatten(1))


def test_example_input_from_a_batch_sampler_loader_keeps_the_batch_dimension():
    # DataLoader(..., sampler=BatchSampler(...), batch_size=None) indexes the dataset with index lists
    torch.manual_seed(12)
    dataset = make_dataset()
    sampler = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(dataset), batch_size=8, drop_last=False)
    loader = torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=None)
    model = BatchShapedMLP(lr=0.05, example=False)
    trainer = cpu_trainer(max_steps=2, callbacks=[GSGDCallback()])
    trainer.fit(model, loader)
    assert trainer.optimizers[0].topology.hidden_units == 16
    assert int(trainer.optimizers[0].steps) == 2
