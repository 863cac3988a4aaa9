"""The plotting helper on logs written by Lightning's own CSVLogger."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest
from lightning.pytorch.loggers import CSVLogger

from lightning_gsgd.diagnostics.plot import main, plot_metrics, read_metrics_csv

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEP_KEYS = (
    "path_grad_norm",
    "basis_path_norm",
    "skeleton_abs_min",
    "skeleton_abs_median",
    "skeleton_abs_max",
    "imbalance",
    "relative_update",
)


def _write_run(root: Path, name: str, *, counters: bool, per_chain: bool = False, steps: int = 60) -> Path:
    """A run logged the way a Trainer does: sparse rows, 'epoch' and 'step' columns, one-off summary."""
    logger = CSVLogger(root, name=name)
    logger.log_metrics({"gsgd/chains": 1.0, "gsgd/hidden_units": 192.0, "gsgd/coverage": 0.98}, step=0)
    for s in range(steps):
        epoch = s // 20
        row = {"epoch": float(epoch), "train_loss": 2.0 / (1 + s)}
        if s % 5 == 4:
            for i, k in enumerate(STEP_KEYS):
                row[f"gsgd/{k}"] = (i + 1) * (1.0 + 0.01 * s)
            if counters:
                row["gsgd/guard_hits"] = float(s // 30)
                row["gsgd/skipped_steps"] = 0.0
            if per_chain:
                row["gsgd/chain0/imbalance"] = 0.1 + 0.001 * s
        logger.log_metrics(row, step=s)
        if s % 20 == 19:
            logger.log_metrics({"epoch": float(epoch), "val_loss": 1.0 / (1 + epoch), "val_acc": 0.5 + 0.1 * epoch}, s)
    logger.save()
    path = Path(logger.log_dir) / "metrics.csv"
    assert path.is_file()
    return path


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_read_metrics_csv_keeps_sparse_rows(tmp_path):
    path = _write_run(tmp_path, "gsgd", counters=True)
    s = read_metrics_csv(path)
    assert "step" not in s and "epoch" not in s
    assert s["train_loss"][0] == [float(i) for i in range(60)]
    assert s["gsgd/imbalance"][0] == [4.0 + 5 * i for i in range(12)]
    assert s["gsgd/imbalance"][1][0] == pytest.approx(6 * 1.04)
    assert s["val_acc"] == ([19.0, 39.0, 59.0], [pytest.approx(0.5), pytest.approx(0.6), pytest.approx(0.7)])
    assert s["gsgd/chains"] == ([0.0], [1.0])


def test_png_of_two_runs_with_a_missing_key(tmp_path):
    gsgd = _write_run(tmp_path, "gsgd", counters=True)
    sgd = _write_run(tmp_path, "sgd", counters=False)
    out = tmp_path / "plots" / "cmp.png"
    report = plot_metrics(gsgd, out, compare=sgd)
    assert report.path == out
    width, height = _png_size(out)
    assert width > 1000 and height > 1000
    assert out.stat().st_size > 30_000
    assert report.panels[:3] == ["train_loss", "val_loss", "val_acc"]
    assert "skeleton paths |v|: min / median / max" in report.panels
    assert "guard hits (cumulative)" in report.panels
    assert len(report.panels) == 3 + 5 + 2  # skeleton statistics share one panel
    assert any("guard_hits" in n and "SGD" in n for n in report.notes)
    assert all("G-SGD" not in n for n in report.notes)


def test_per_chain_keys_only_on_request(tmp_path):
    run = _write_run(tmp_path, "gsgd", counters=True, per_chain=True)
    plain = plot_metrics(run, tmp_path / "a.png")
    chains = plot_metrics(run, tmp_path / "b.png", per_chain=True)
    assert "chain0/imbalance" not in plain.panels
    assert chains.panels == plain.panels + ["chain0/imbalance"]


def test_cli_writes_png(tmp_path, capsys):
    gsgd = _write_run(tmp_path, "gsgd", counters=True)
    sgd = _write_run(tmp_path, "sgd", counters=False)
    out = tmp_path / "cli.png"
    args = [str(gsgd), "--compare", str(sgd), "-o", str(out), "--labels", "G-SGD", "SGD"]
    assert main(args + ["--keys", "train_loss", "gsgd/imbalance", "gsgd/guard_hits"]) == 0
    assert _png_size(out)[0] > 500
    assert out.stat().st_size > 10_000


def test_cli_reports_a_bad_file(tmp_path, capsys):
    bad = tmp_path / "x.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(SystemExit) as e:
        main([str(bad), "-o", str(tmp_path / "x.png")])
    assert e.value.code == 2
    assert "no 'step' column" in capsys.readouterr().err


def test_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    run = _write_run(tmp_path, "gsgd", counters=True, steps=10)
    for mod in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(ImportError, match=r"lightning-gsgd\[plot\]"):
        plot_metrics(run, tmp_path / "x.png")
