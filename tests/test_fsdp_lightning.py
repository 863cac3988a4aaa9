"""Lightning's ModelParallelStrategy (FSDP2) with GSGDCallback beyond the 2-process G-SGD fit of
tests/test_fsdp.py: Adam converted to GAdamW on sharded weights, and G-SGD on 4 processes."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests import fsdp_lightning_script
from tests.lightning_models import MLPModule, make_dataset, params_of, sampler_steps, train_by_hand
from tests.test_fsdp import _DIST_ENV, ROOT

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _run(out: Path, world: int, optimizer: str) -> tuple[dict, dict, list]:
    """Run the short form of tests/fsdp_lightning_script.py: (straight fit, resumed fit, logged per rank)."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV and not k.startswith("PL_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    script = ROOT / "tests" / "fsdp_lightning_script.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(out), str(world), optimizer],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    full = torch.load(out / "full.pt", weights_only=True)
    resumed = torch.load(out / "resumed.pt", weights_only=True)
    logged = [torch.load(out / f"logged{r}.pt", weights_only=True) for r in range(world)]
    return full, resumed, logged


def _resumed_equals_straight(full: dict, resumed: dict, steps: int) -> None:
    """Weights, every optimizer state tensor and the counters of the resumed fit equal the straight fit's."""
    tensors = [k for k in full if k.startswith(("net.", "state/"))]
    assert sorted(tensors) == sorted(k for k in resumed if k.startswith(("net.", "state/")))
    for k in tensors:
        assert torch.equal(full[k], resumed[k]), k
    for name in (*fsdp_lightning_script.COUNTERS, "bytes"):
        assert torch.equal(resumed[name], full[name]), (name, resumed[name], full[name])
    assert int(full["steps"]) == steps and int(full["skipped_steps"]) == 0


def _same_diagnostics(logged: list, steps: list[int], nbytes: int) -> None:
    """The gsgd/ diagnostics of every logging step are identical on every rank."""
    assert all(rows == logged[0] for rows in logged) and [s for s, _ in logged[0]] == steps, logged
    for _, values in logged[0]:
        assert values["gsgd/comm_bytes_per_step"] == float(nbytes) and len(values) == 4, values
        assert all(math.isfinite(v) and v > 0 for v in values.values()), values


@pytest.mark.slow
def test_model_parallel_adamw_fit_checkpoint_resume(tmp_path):
    """torch's AdamW (amsgrad, betas, decoupled decay) becomes GAdamW on 2 ranks' row-sharded weights; a fit
    resumed from a distributed checkpoint equals the straight one bit for bit: weights, ``exp_avg``,
    ``exp_avg_sq``, ``max_exp_avg_sq``, every tensor's ``step`` and the counters (the resume's
    zero-gradient state init of torch is not counted)."""
    full, resumed, logged = _run(tmp_path, 2, "adamw")
    assert full["optimizer"] == resumed["optimizer"] == "GAdamW"
    assert {"state/net.2.weight.max_exp_avg_sq", "state/net.2.weight.step", "state/net.4.bias.exp_avg"} <= set(full)
    assert all(float(full[k]) == 8 for k in full if k.endswith(".step"))  # torch's per-tensor counters
    _resumed_equals_straight(full, resumed, steps=8)
    _same_diagnostics(logged, [2, 5], int(full["bytes"]))


@pytest.mark.slow
def test_model_parallel_four_processes(tmp_path):
    """G-SGD on 4 ranks (the 7 hidden rows split 2, 2, 2, 1; the 3 output rows 1, 1, 1, 0): the resumed fit
    equals the straight one bit for bit, the diagnostics agree on all ranks, and the fit equals one
    process stepping GSGD on the global batches (the 4 ranks' batches) to float32 rounding: FSDP2's
    reduce-scatter sums 4 gradients in its own order."""
    full, resumed, logged = _run(tmp_path, 4, "sgd")
    assert full["optimizer"] == "GSGD" and "state/net.2.weight.momentum_buffer" in full
    _resumed_equals_straight(full, resumed, steps=4)
    _same_diagnostics(logged, [2], int(full["bytes"]))
    dataset = make_dataset()
    x, y = dataset.tensors
    steps = sampler_steps(dataset, world=4, per_rank=fsdp_lightning_script.PER_RANK_BATCH, epochs=2)
    torch.manual_seed(fsdp_lightning_script.SEED)
    module = MLPModule(lr=0.05, momentum=0.9, weight_decay=1e-3, hidden=7)
    batches = [(x[idx], y[idx]) for s in steps for idx in s]
    train_by_hand(module, batches, lr=0.05, momentum=0.9, weight_decay=1e-3, accumulate=4)
    want = params_of(module)
    assert sorted(want) == sorted(k for k in full if k.startswith("net."))
    for k, value in want.items():
        torch.testing.assert_close(full[k], value, rtol=1e-6, atol=1e-7, msg=k)
