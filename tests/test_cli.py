"""LightningCLI: GSGDCallback from flags and from YAML, ``--optimizer lightning_gsgd.GSGD`` with the mixin, --help."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from cli import cli_main  # examples/cli.py (tests/conftest.py puts examples/ on sys.path)

from lightning_gsgd import GSGD, GSGDCallback

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def restore_environ(monkeypatch):
    """LightningCLI seeds everything, which writes PL_GLOBAL_SEED into os.environ; it also reads sys.argv."""
    monkeypatch.setattr(sys, "argv", ["examples/cli.py"])
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _quiet(tmp_path: Path) -> list[str]:
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


def _fit(args: list[str]) -> tuple[GSGDCallback, GSGD]:
    cli = cli_main(args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    (callback,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, GSGDCallback)]
    opt = cli.trainer.optimizers[0]
    assert type(opt) is GSGD and opt.is_bound and int(opt.steps) == 2
    return callback, opt


def test_callback_from_flags(tmp_path):
    callback, opt = _fit(
        [
            "--model=MLPClassifier",
            "--trainer.callbacks+=lightning_gsgd.GSGDCallback",
            "--trainer.callbacks.lr=0.07",
            "--trainer.callbacks.skeleton_init=true",
            *_quiet(tmp_path),
        ]
    )
    assert callback.overrides.lr == 0.07 and opt.param_groups[0]["lr"] == 0.07


def test_compiled_kernels_from_a_flag(tmp_path):
    _, opt = _fit(
        [
            "--model=MLPClassifier",
            "--trainer.callbacks+=lightning_gsgd.GSGDCallback",
            "--trainer.callbacks.compiled=true",
            *_quiet(tmp_path),
        ]
    )
    assert opt.compiled and opt._graphs is not None and opt._graphs.compiled


def test_callback_from_yaml_config(tmp_path):
    callback, opt = _fit(["--config", str(ROOT / "examples" / "gsgd_callback.yaml"), *_quiet(tmp_path)])
    assert (callback.overrides.lr, callback.overrides.momentum, callback.min_coverage) == (0.05, 0.9, 0.5)
    assert opt.param_groups[0]["momentum"] == 0.9


@pytest.mark.parametrize(
    "how",
    [
        ["--model=GSGDMLPClassifier"],
        ["--model=MLPClassifier", "--trainer.callbacks+=lightning_gsgd.GSGDCallback"],
    ],
    ids=["mixin", "callback"],
)
def test_cli_optimizer_gsgd_from_bare_parameters_is_bound(tmp_path, how):
    _, opt = _fit([*how, "--optimizer=lightning_gsgd.GSGD", "--optimizer.lr=0.03", *_quiet(tmp_path)])
    assert opt.param_groups[0]["lr"] == 0.03


def test_help_lists_the_callback_arguments(capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["fit", "--trainer.callbacks.help", "lightning_gsgd.GSGDCallback"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    args = ("lr", "momentum", "weight_decay", "skeleton_init", "min_ratio", "allow_empty", "min_coverage")
    for arg in args + ("diagnostics", "per_chain", "invariance_check"):
        assert f"--trainer.callbacks.{arg} " in out, arg
    assert "keeps the configured optimizer's" in out  # the Args: docstring became the help text
    assert "gsgd/invariance_residual" in out


# The documented shell commands (python examples/cli.py fit ...) are run in tests/test_examples.py.
