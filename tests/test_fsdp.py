"""G-SGD under FSDP2 (``fully_shard``) on 2 and 4 CPU processes (gloo) equals the unsharded step."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests import fsdp_script

ROOT = Path(__file__).resolve().parents[1]
_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE")

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(script: Path, world: int, out: Path, timeout: float = 120) -> None:
    """Run ``script OUT`` once per rank (gloo on 127.0.0.1); every process is ended before returning."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV and not k.startswith("PL_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(out)],
            cwd=ROOT,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode != 0]
    assert not failed, f"ranks failed: {failed}\n" + "\n".join(log[-3000:] for log in logs)


@pytest.fixture(scope="module")
def unsharded() -> dict:
    torch.set_num_threads(1)
    return {name: fsdp_script.run_case(name, None) for name in fsdp_script.CASES}


def _check(out: Path, unsharded: dict, world: int) -> dict:
    got = torch.load(out / "result.pt", weights_only=True)
    for name, want in unsharded.items():
        res = got[name]
        assert res["steps"] == fsdp_script.STEPS and res["skipped"] == 0, (name, res["steps"], res["skipped"])
        params = [k for k in want if isinstance(want[k], torch.Tensor)]
        assert sorted(params) == sorted(k for k in res if isinstance(res[k], torch.Tensor)), name
        for key in params:
            # unsharded buffers are [n_out, n_in, taps]; sharded ones are shaped like their DTensor parameter
            torch.testing.assert_close(
                res[key].view_as(want[key]), want[key], rtol=1e-6, atol=1e-7, msg=f"{name} {key} (world {world})"
            )
    return got


def _bit_identical(got: dict, unsharded: dict) -> bool:
    return all(
        torch.equal(got[name][k].view_as(want[k]), want[k])
        for name, want in unsharded.items()
        for k in want
        if isinstance(want[k], torch.Tensor)
    )


def test_detection_on_an_unsharded_copy_only(unsharded):
    assert "DTensor" not in str(type(unsharded["mlp"]["0.weight"]))


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_fully_shard_equals_unsharded(tmp_path, unsharded, world):
    run_ranks(ROOT / "tests" / "fsdp_script.py", world, tmp_path)
    got = _check(tmp_path, unsharded, world)
    # same batch on every rank: the averaged gradients equal the single-process ones, and so does the step
    assert _bit_identical(got, unsharded)
    assert "before fully_shard" in got["refused"] and "shard_topology" in got["refused"]
    compiled, gadam, stale = got["optimizers_refused"]
    assert "compiled=True" in compiled and "does not support sharded" in gadam and "shard_topology" in stale
    assert got["skip"] == [1, 1], "a NaN in one rank's rows must skip the step on every rank"
    # O(H), not O(m): 100x more inputs, same bytes; and the bound from the layout
    assert got["bytes_wide"] == got["bytes_narrow"] > 0
    H, n_sel_max, elsize = 7 + 5, (7 + 5) * 2 + 3, 4
    assert got["mlp"]["bytes"] <= world * (3 * n_sel_max + H + 2) * elsize


def test_lightning_model_parallel_fit_and_resume(tmp_path):
    """ModelParallelStrategy (FSDP2 in configure_model) on 2 CPU processes: the callback fits, and a fit resumed
    from a distributed checkpoint equals the straight one bit for bit."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV and not k.startswith("PL_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "fsdp_lightning_script.py"), str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    params = [k for k in full if k not in ("steps", "bytes")]
    for k in params:
        assert torch.equal(full[k], resumed[k]), k
    assert int(full["steps"]) == 8 and 0 < int(full["bytes"]) < 1000
    # Not yet held: equality with one process on the global batches (train_by_hand); the weights differed
    # by up to 0.1 when tried, unexplained so far (the step alone is held by test_fully_shard_equals_unsharded).
