"""GSGDCallback with Adam and AdamW: conversion to GAdam/GAdamW, refusals, checkpoint resume, bf16, CLI."""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_gsgd import GAdam, GAdamW, GSGDCallback, detect_topology, init_skeleton_
from tests.lightning_models import MLPModule, clone, cpu_trainer, make_dataset, make_loader, params_of


class AdamModule(MLPModule):
    """The 4-8-8-3 MLP with a torch Adam-family optimizer chosen by ``kind`` (and optional options)."""

    def __init__(self, kind: str = "adam", scheduler: str | None = None, options: dict | None = None, **kw: Any):
        super().__init__(scheduler=scheduler, **kw)
        self.kind, self.options = kind, dict(options or {})

    def configure_optimizers(self) -> Any:
        wd = self.weight_decay
        if self.kind == "adam":
            opt: Any = torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=wd, **self.options)
        elif self.kind == "adamw":
            opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=wd, **self.options)
        elif self.kind == "adam_groups":
            net = self.net
            opt = torch.optim.Adam(
                [
                    {"params": net[0].parameters(), "lr": 3 * self.lr, "betas": (0.5, 0.9)},
                    {"params": [*net[2].parameters(), *net[4].parameters()], "amsgrad": True},
                ],
                lr=self.lr,
                weight_decay=wd,
            )
        elif self.kind == "rmsprop":
            opt = torch.optim.RMSprop(self.parameters(), lr=self.lr)
        else:
            raise ValueError(self.kind)
        if self.scheduler_kind == "step":
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return opt


def _by_hand(module: AdamModule, batches: list, steps: int, *, autocast_bf16: bool = False) -> GAdam:
    """GAdam/GAdamW driven without Lightning, from the same configure_optimizers."""
    topology = detect_topology(module, module.example_input_array)
    init_skeleton_(topology)
    torch_opt = module.configure_optimizers()
    torch_opt = torch_opt["optimizer"] if isinstance(torch_opt, dict) else torch_opt
    cls = GAdamW if type(torch_opt) is torch.optim.AdamW else GAdam
    groups = [
        {k: v for k, v in g.items() if k not in ("foreach", "maximize", "capturable", "differentiable", "fused")}
        for g in torch_opt.param_groups
    ]
    if cls is GAdamW:
        for g in groups:
            g.pop("decoupled_weight_decay", None)
    opt = cls(groups, topology=topology)
    module.train()
    for i, batch in enumerate(batches[:steps]):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
            loss = module.training_step(batch, i)
        loss.backward()
        opt.step()
    return opt


def _fit(model: AdamModule, steps: int, callback: GSGDCallback | None = None, **kw: Any):
    loader = make_loader(make_dataset(), 8)
    trainer = cpu_trainer(max_steps=steps, callbacks=[callback or GSGDCallback()], **kw)
    trainer.fit(model, loader)
    return trainer, list(loader) * 4


def _assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    got, want = params_of(a), params_of(b)
    for name in want:
        assert torch.equal(got[name], want[name]), f"{name}: {(got[name] - want[name]).abs().max()}"


@pytest.mark.parametrize(
    ("kind", "cls", "options"),
    [
        ("adam", GAdam, {}),
        ("adam", GAdam, {"amsgrad": True, "betas": (0.8, 0.95), "eps": 1e-6}),
        ("adamw", GAdamW, {}),
        ("adam_groups", GAdam, {}),
    ],
)
def test_callback_converts_adam_and_adamw_and_equals_by_hand(kind, cls, options):
    torch.manual_seed(0)
    model = AdamModule(kind, options=options, lr=0.01, weight_decay=0.01)
    ref = clone(model)
    trainer, batches = _fit(model, steps=5)
    opt = trainer.optimizers[0]
    assert type(opt) is cls and opt.is_bound and int(opt.steps) == 5
    torch_groups = AdamModule(kind, options=options, lr=0.01, weight_decay=0.01).configure_optimizers().param_groups
    for g, t in zip(opt.param_groups, torch_groups):
        for key in ("lr", "betas", "eps", "weight_decay", "amsgrad"):
            assert g[key] == t[key], key
    _by_hand(ref, batches, 5)
    _assert_same(model, ref)


def test_callback_overrides_lr_and_weight_decay_of_adam():
    torch.manual_seed(1)
    model = AdamModule("adamw", lr=0.5, weight_decay=0.5)
    trainer, _ = _fit(model, steps=2, callback=GSGDCallback(lr=0.02, weight_decay=0.03, min_ratio=0.05))
    g = trainer.optimizers[0].param_groups[0]
    assert (g["lr"], g["weight_decay"], g["min_ratio"]) == (0.02, 0.03, 0.05)
    assert type(trainer.optimizers[0]) is GAdamW


def test_callback_compiled_true_converts_adamw_to_a_compiled_gadamw(monkeypatch):
    from lightning_gsgd.step import adam_compiled
    from lightning_gsgd.step.adam_graph import AdamGraphs

    monkeypatch.setattr(adam_compiled, "AdamGraphs", lambda: AdamGraphs(backend="eager", fullgraph=True))
    torch.manual_seed(0)
    model = AdamModule("adamw", lr=0.01, weight_decay=0.01)
    ref, start = clone(model), params_of(model)
    trainer, batches = _fit(model, steps=4, callback=GSGDCallback(compiled=True))
    opt = trainer.optimizers[0]
    assert type(opt) is GAdamW and opt.compiled and opt._graphs is not None and opt._graphs.compiled
    _by_hand(ref, batches, 4)
    got, want = params_of(model), params_of(ref)
    assert max(float((want[n] - start[n]).abs().max()) for n in want) > 1e-3  # training moved the weights
    for n in want:  # float32: the graph rounds differently from the eager passes
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("model", "callback", "match"),
    [
        (AdamModule("adam"), GSGDCallback(momentum=0.9), "momentum=.*applies to SGD only.*betas"),
        (AdamModule("adam", options={"foreach": True}), None, r"cannot convert torch.optim.Adam\(foreach=True\)"),
        (AdamModule("adam", options={"maximize": True}), None, r"cannot convert torch.optim.Adam\(maximize=True\)"),
        (AdamModule("adamw", options={"capturable": True}), None, r"torch.optim.AdamW\(capturable=True\)"),
        (AdamModule("rmsprop"), None, "converts torch.optim.SGD, Adam and AdamW.*returned RMSprop"),
    ],
    ids=["momentum", "foreach", "maximize", "capturable", "rmsprop"],
)
def test_unsupported_adam_set_ups_are_refused(model, callback, match):
    with pytest.raises(MisconfigurationException, match=match):
        _fit(model, steps=1, callback=callback)


def test_resume_from_checkpoint_is_bit_identical(tmp_path):
    def make(seed: int) -> AdamModule:
        torch.manual_seed(seed)
        return AdamModule("adamw", scheduler="step", options={"amsgrad": True}, lr=0.02, weight_decay=0.01)

    loader = make_loader(make_dataset(), 8)
    full = make(0)
    cpu_trainer(max_epochs=2, callbacks=[GSGDCallback()]).fit(full, loader)

    first = make(0)
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    cpu_trainer(max_epochs=1, callbacks=[GSGDCallback(), saver], enable_checkpointing=True).fit(first, loader)
    last = tmp_path / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["optimizer_states"][0]["gsgd"]["kind"] == "adam"

    resumed = make(123)
    trainer = cpu_trainer(max_epochs=2, callbacks=[GSGDCallback()])
    trainer.fit(resumed, loader, ckpt_path=last)
    _assert_same(resumed, full)
    opt = trainer.optimizers[0]
    assert type(opt) is GAdamW and int(opt.steps) == 8
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is opt
    assert opt.param_groups[0]["lr"] == 0.02 * 0.5**4


def test_bf16_mixed_equals_autocast_by_hand():
    torch.manual_seed(2)
    model = AdamModule("adam", lr=0.01)
    ref = clone(model)
    trainer, batches = _fit(model, steps=3, precision="bf16-mixed")
    assert type(trainer.optimizers[0]) is GAdam and int(trainer.optimizers[0].steps) == 3
    _by_hand(ref, batches, 3, autocast_bf16=True)
    _assert_same(model, ref)


# ---------------------------------------------------------------- CLI
@pytest.fixture
def cli_env(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["examples/cli.py"])
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _quiet(tmp_path) -> list[str]:
    return [
        "--trainer.max_steps=2",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.limit_val_batches=0",
        f"--trainer.default_root_dir={tmp_path}",
        "--seed_everything=0",
        "--data.batch_size=16",
    ]


@pytest.mark.parametrize(
    ("args", "cls"),
    [
        (["--model=MLPClassifier", "--trainer.callbacks+=lightning_gsgd.GSGDCallback", "--optimizer=AdamW"], GAdamW),
        (["--model=MLPClassifier", "--trainer.callbacks+=lightning_gsgd.GSGDCallback", "--optimizer=Adam"], GAdam),
        (
            [
                "--model=MLPClassifier",
                "--trainer.callbacks+=lightning_gsgd.GSGDCallback",
                "--optimizer=lightning_gsgd.GAdam",
            ],
            GAdam,
        ),
        (["--model=GSGDMLPClassifier", "--optimizer=lightning_gsgd.GAdamW"], GAdamW),
    ],
    ids=["AdamW+callback", "Adam+callback", "GAdam+callback", "GAdamW+mixin"],
)
def test_cli_adam_forms(tmp_path, cli_env, args, cls):
    from cli import cli_main  # examples/cli.py (tests/conftest.py puts examples/ on sys.path)

    cli = cli_main([*args, "--optimizer.lr=0.003", *_quiet(tmp_path)], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    opt = cli.trainer.optimizers[0]
    assert type(opt) is cls and opt.is_bound and int(opt.steps) == 2
    assert opt.param_groups[0]["lr"] == 0.003


# ---------------------------------------------------------------- DDP
def test_ddp_replicas_identical_without_collectives_and_equal_single_process(tmp_path):
    import torch.distributed as dist

    from tests import ddp_script
    from tests.lightning_models import NoCollectivesInStep, SaveParams
    from tests.test_ddp import _global_batches

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    saved = dict(os.environ)
    try:
        strategy = "ddp_spawn" if torch.cuda.is_initialized() else "ddp_fork"
        torch.manual_seed(ddp_script.SEED)
        model = AdamModule("adamw", lr=0.01, weight_decay=0.01, options={"amsgrad": True})
        ref = clone(model)
        guard = NoCollectivesInStep()
        trainer = cpu_trainer(
            strategy=strategy,
            devices=2,
            max_steps=ddp_script.STEPS,
            callbacks=[GSGDCallback(), guard, SaveParams(str(tmp_path))],
        )
        trainer.fit(model, make_loader(make_dataset(), ddp_script.PER_RANK_BATCH))
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"replicas differ in {name}"
    _by_hand(ref, _global_batches(seed), ddp_script.STEPS)
    want = ref.state_dict()
    for name in want:
        torch.testing.assert_close(rank0[name], want[name], rtol=1e-5, atol=1e-6)
