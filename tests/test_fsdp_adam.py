"""GAdam / GAdamW under FSDP2 (``fully_shard``) on 2 and 4 CPU processes (gloo) equal the unsharded step."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests import fsdp_adam_script
from tests.test_fsdp import ROOT, run_ranks

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


@pytest.fixture(scope="module")
def unsharded() -> dict:
    torch.set_num_threads(1)
    return {
        (name, host_reads): fsdp_adam_script.run_case(name, None, host_reads=host_reads)
        for name in fsdp_adam_script.CASES
        for host_reads in (None, False)
    }


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_sharded_gadam_equals_unsharded(tmp_path, unsharded, world):
    """10 steps of GAdam (L2 decay, betas) and GAdamW (decoupled decay), with and without amsgrad, on an MLP
    with biases and uneven rows (7, 5, 3 over 2 or 4 ranks; with 4, one rank holds no row of 5 or 3) and a
    CNN, each layer its own FSDP unit or not, on the CPU path and the synchronization-free one: the gathered
    weights and the whole Adam state (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) equal one
    process's bit for bit. Every rank feeds the same batch, so FSDP2's averaged gradients equal the
    single-process ones, and the step uses the same numbers and operations on every entry (row sums are
    the same reductions over the same rows, the O(H) part is replicated)."""
    run_ranks(ROOT / "tests" / "fsdp_adam_script.py", world, tmp_path)
    got = torch.load(tmp_path / "result.pt", weights_only=True)
    for (name, host_reads), want in unsharded.items():
        res = got[name if host_reads is None else name + "/no_host_reads"]
        for counter in ("steps", "skipped_steps", "guard_hits", "collapsed_steps"):
            assert res[counter] == want[counter], (name, host_reads, counter, res[counter], want[counter])
        assert res["steps"] == fsdp_adam_script.STEPS, name
        keys = sorted(k for k in want if isinstance(want[k], torch.Tensor))
        assert keys == sorted(k for k in res if isinstance(res[k], torch.Tensor)), (name, keys)
        assert any(k.endswith(".exp_avg") for k in keys) and any(k.endswith(".step") for k in keys)
        if fsdp_adam_script.CASES[name][3].get("amsgrad"):
            assert any(k.endswith(".max_exp_avg_sq") for k in keys), name
        for k in keys:
            assert torch.equal(res[k], want[k]), (name, host_reads, k, world, (res[k] - want[k]).abs().max())
    # the guard clamped somewhere, so its sharded bookkeeping is exercised
    assert unsharded[("mlp_adamw_ams", None)]["guard_hits"] > 0
    # a NaN in a hidden layer's rows of one rank: every rank skips, nothing moves, steps not counted
    assert got["skip"] == [1, 1, 1]
    # O(H), not O(m): 100x more inputs, same bytes; and the bound from the layout (amsgrad: 3 moments)
    assert got["bytes_wide"] == got["bytes_narrow"] > 0
    H, n_sig, n_tau, elsize = 7 + 5, 7 + 5, 7 + 5, 4
    assert got["bytes_narrow"] <= world * (2 * (n_sig + n_tau) + 3 * n_tau + H + 4) * elsize
