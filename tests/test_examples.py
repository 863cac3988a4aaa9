"""Smoke tests of the scripts in examples/: each runs at a tiny size and prints what its docstring promises.

The single-process examples run in-process through their ``__main__`` block (``runpy``), so argument
parsing and the printed line are tested without paying for a new interpreter. The CLI and DDP
examples run as the README shows them (``python examples/NAME.py ...``) in a subprocess whose
``PYTHONPATH`` holds only the ``lightning_gsgd`` package, as after ``pip install -e .``: the
repository root (and so ``examples`` and ``tests`` as packages) is not importable there.
"""

from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
ACCURACY = r"(\d\.\d{3})"


@pytest.fixture(autouse=True)
def restore_process_state(monkeypatch):
    """The examples seed everything (which writes PL_GLOBAL_SEED) and set torch's thread count."""
    import torch

    saved_env, threads = dict(os.environ), torch.get_num_threads()
    yield
    os.environ.clear()
    os.environ.update(saved_env)
    torch.set_num_threads(threads)


def _run_main(monkeypatch, capsys, script: str, *args: str) -> str:
    """Run examples/SCRIPT as ``python examples/SCRIPT ARGS`` would, in this process; return its stdout."""
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / script), *args])
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def package_only_env(tmp_path_factory) -> dict[str, str]:
    """Environment for a subprocess that can import lightning_gsgd but not the repository root."""
    site = tmp_path_factory.mktemp("site")
    (site / "lightning_gsgd").symlink_to(ROOT / "lightning_gsgd", target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PL_GLOBAL_SEED")}
    env["PYTHONPATH"] = str(site)
    return env


def _run_script(env: dict[str, str], cwd: Path, *args: str, timeout: float = 180) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def _accuracy(pattern: str, out: str) -> float:
    match = re.search(pattern, out)
    assert match is not None, f"no line matching {pattern!r} in:\n{out}"
    return float(match.group(1))


@pytest.fixture
def fits(monkeypatch) -> list[tuple[str, bool, list]]:
    """Record, for every ``Trainer.fit``, the optimizer that trained, whether it was bound, and the callbacks."""
    import lightning

    records: list[tuple[str, bool, list]] = []
    real_fit = lightning.Trainer.fit

    def fit(trainer, *args, **kwargs):
        real_fit(trainer, *args, **kwargs)
        opt = trainer.optimizers[0]
        records.append((type(opt).__name__, bool(getattr(opt, "is_bound", False)), list(trainer.callbacks)))

    monkeypatch.setattr(lightning.Trainer, "fit", fit)
    return records


def test_quickstart_prints_the_test_accuracy(monkeypatch, capsys, fits):
    out = _run_main(monkeypatch, capsys, "quickstart.py", "--epochs", "2")
    accuracy = _accuracy(r"^G-SGD test accuracy on sklearn digits \(360 test images\): " + ACCURACY + "$", out)
    assert accuracy > 0.6  # chance is 0.1; the full 20 epochs reach about 0.98
    assert [(name, bound) for name, bound, _ in fits] == [("GSGD", True)]


def test_mnist1d_mlp_compares_three_methods(monkeypatch, capsys, fits):
    args = ("--epochs", "3", "--num-samples", "1000", "--width", "32", "--compare")
    out = _run_main(monkeypatch, capsys, "mnist1d_mlp.py", *args)
    for method in ("gsgd", "sgd", "sgd+skeleton"):
        line = rf"^ *{re.escape(method)} test accuracy on MNIST-1D \(200 test examples\): " + ACCURACY + "$"
        assert re.search(line, out, re.MULTILINE), f"{method}:\n{out}"
        assert float(re.search(line, out, re.MULTILINE).group(1)) > 0.15, method  # chance is 0.1
    assert [name for name, _, _ in fits] == ["GSGD", "SGD", "SGD"]


def test_mnist1d_mlp_rejects_an_unknown_method():
    import mnist1d_mlp

    with pytest.raises(ValueError, match="unknown method 'adam'"):
        mnist1d_mlp.train("adam", None, 1, 8, 0.1, 8, 0)  # type: ignore[arg-type]


def test_digits_cnn_mixin_trains_with_the_mixin_alone(monkeypatch, capsys, fits):
    from lightning_gsgd import GSGDCallback

    out = _run_main(monkeypatch, capsys, "digits_cnn_mixin.py", "--epochs", "2")
    accuracy = _accuracy(r"CNN test accuracy on sklearn digits \(360 test images\): " + ACCURACY, out)
    assert accuracy > 0.6
    ((name, bound, callbacks),) = fits
    assert (name, bound) == ("GSGD", True)
    (callback,) = [cb for cb in callbacks if isinstance(cb, GSGDCallback)]
    assert callback.min_coverage == 1.0  # the one configure_gsgd returned (the Trainer was given none)


def test_cli_yaml_command_as_documented(package_only_env, tmp_path):
    out = _run_script(
        package_only_env,
        ROOT,
        "examples/cli.py",
        "fit",
        "--config",
        "examples/gsgd_callback.yaml",
        "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
    )
    assert _accuracy(r"GSGD held-out accuracy on sklearn digits \(360 images\): " + ACCURACY, out) > 0.6
    assert (tmp_path / "config.yaml").exists()  # the CLI saved its config where it was told, not in the repo


@pytest.mark.slow  # a fresh interpreter per command (~10 s each); the same paths run in-process in test_cli.py
@pytest.mark.parametrize(
    "args",
    [
        ["--model", "MLPClassifier", "--trainer.callbacks+=lightning_gsgd.GSGDCallback", "--trainer.callbacks.lr=0.05"],
        ["--model", "GSGDMLPClassifier", "--optimizer", "lightning_gsgd.GSGD", "--optimizer.lr=0.05"],
    ],
    ids=["callback-flags", "mixin-optimizer"],
)
def test_cli_flag_commands_as_documented(package_only_env, tmp_path, args):
    # Run from another directory: the documented commands must not depend on the working directory.
    quiet = ["--trainer.max_epochs=1", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}"]
    out = _run_script(package_only_env, tmp_path, str(EXAMPLES / "cli.py"), "fit", *args, *quiet)
    assert _accuracy(r"GSGD held-out accuracy on sklearn digits \(360 images\): " + ACCURACY, out) > 0.5


@pytest.mark.slow  # two fresh interpreters (~20 s); DDP itself is tested in the default run by tests/test_ddp.py
def test_ddp_cpu_replicas_identical(package_only_env):
    out = _run_script(package_only_env, ROOT, "examples/ddp_cpu.py", "--epochs", "1")
    assert "replicas identical: True (13130 parameters on each of 2 processes compared bit for bit)" in out
    (line,) = [ln for ln in out.splitlines() if ln.startswith("rank ")]  # printed by rank zero only
    assert line.startswith("rank 0 of 2: GSGD, 23 steps, ")
    assert _accuracy(r"test accuracy on sklearn digits \(360 test images\): " + ACCURACY, line) > 0.6
