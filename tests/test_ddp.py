"""DDP on 2 CPU processes: replicas stay bit-identical and match one process on the global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from lightning_gsgd import GSGDCallback
from tests import ddp_script
from tests.lightning_models import (
    MLPModule,
    NoCollectivesInStep,
    SaveParams,
    cpu_trainer,
    make_dataset,
    make_loader,
    train_by_hand,
)

ROOT = Path(__file__).resolve().parents[1]
_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE")

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


@pytest.fixture
def clean_distributed():
    """Restore os.environ (Lightning sets MASTER_PORT etc.) and tear down any process group."""
    saved = dict(os.environ)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


def _global_batches(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Lightning gives each training rank a DistributedSampler(shuffle=True, seed=PL_GLOBAL_SEED or 0);
    a global batch is the union of the ranks' batches at the same step."""
    dataset = make_dataset()
    per_rank = [list(DistributedSampler(dataset, num_replicas=2, rank=r, shuffle=True, seed=seed)) for r in (0, 1)]
    b = ddp_script.PER_RANK_BATCH
    batches = []
    for k in range(ddp_script.STEPS):
        idx = torch.tensor(per_rank[0][k * b : (k + 1) * b] + per_rank[1][k * b : (k + 1) * b])
        batches.append((dataset.tensors[0][idx], dataset.tensors[1][idx]))
    return batches


def _check(out: Path, seed: int) -> None:
    """Both ranks are identical, and equal one process stepping on the global batch (2 x 4 samples)."""
    rank0, rank1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"replicas differ in {name}"
    torch.manual_seed(ddp_script.SEED)
    ref = MLPModule(lr=0.05, momentum=0.9)
    start = ref.state_dict()["net.2.weight"].clone()
    train_by_hand(ref, _global_batches(seed), lr=0.05, momentum=0.9)
    want = ref.state_dict()
    assert rank0.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(rank0[name], want[name], rtol=1e-5, atol=1e-6)
    assert not torch.equal(rank0["net.2.weight"], start)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_ddp_in_process_replicas_identical_and_equal_single_process(tmp_path, clean_distributed, compiled):
    # ddp_fork costs no imports; it cannot start once CUDA is initialized (e.g. by a GPU test), then spawn.
    strategy = "ddp_spawn" if torch.cuda.is_initialized() else "ddp_fork"
    torch.manual_seed(ddp_script.SEED)
    model = MLPModule(lr=0.05, momentum=0.9, example=False)  # the example input comes from the training data
    # compiled: each rank compiles the same graph; it adds no collective (NoCollectivesInStep) and
    # keeps the replicas bit-identical
    callbacks = [GSGDCallback(compiled=compiled), NoCollectivesInStep(), SaveParams(str(tmp_path))]
    trainer = cpu_trainer(strategy=strategy, devices=2, max_steps=ddp_script.STEPS, callbacks=callbacks)
    trainer.fit(model, make_loader(make_dataset(), ddp_script.PER_RANK_BATCH))
    _check(tmp_path, seed=int(os.environ.get("PL_GLOBAL_SEED", 0)))
    ran = [int((tmp_path / f"graphs{r}.txt").read_text()) for r in (0, 1)]
    assert ran == ([1, 1] if compiled else [0, 0]), ran


def test_real_ddp_in_a_subprocess(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV and not k.startswith("PL_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "ddp_script.py"), str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    _check(tmp_path, seed=0)
