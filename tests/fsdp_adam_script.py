"""GAdam / GAdamW on models sharded by ``fully_shard`` (FSDP2), one process per rank on CPU/gloo.

Run by tests/test_fsdp_adam.py, one process per rank:
``RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/fsdp_adam_script.py OUT``.
Rank 0 writes ``OUT/result.pt``: per case the gathered weights and Adam state after :data:`STEPS`
steps, the step counters and the bytes communicated per step. The test runs the same cases unsharded
in one process (:func:`run_case` with ``shard=None``) and compares.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_gsgd import GAdam, GAdamW, detect_topology, init_skeleton_, shard_topology
from tests.fsdp_script import cnn, mlp

STEPS = 10

#: name: (model factory, input shape, optimizer, hyper-parameters, skeleton init, wrap every layer separately)
CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], type, dict[str, Any], bool, bool]] = {
    "mlp_adam_l2": (mlp, (8, 6), GAdam, {"lr": 0.02, "betas": (0.8, 0.99), "weight_decay": 1e-2}, True, True),
    "mlp_adamw_ams": (mlp, (8, 6), GAdamW, {"lr": 0.02, "weight_decay": 0.05, "amsgrad": True}, False, False),
    "cnn_adam_ams": (cnn, (8, 2, 8, 8), GAdam, {"lr": 0.01, "weight_decay": 1e-3, "amsgrad": True}, False, True),
    "cnn_adamw": (cnn, (8, 2, 8, 8), GAdamW, {"lr": 0.01, "betas": (0.5, 0.9), "weight_decay": 0.1}, True, False),
}


def run_case(name: str, shard: Callable[[nn.Module], None] | None, host_reads: bool | None = None) -> dict[str, Any]:
    """Build, (shard,) and train case ``name`` for :data:`STEPS` steps; every rank sees the same batches.

    Returns:
        The full weights and Adam state tensors by parameter name, the counters and the bytes per step.
    """
    factory, shape, cls, hp, skeleton, _ = CASES[name]
    torch.manual_seed(0)
    model = factory()
    batches = [(torch.randn(shape), torch.randn(shape[0], 3)) for _ in range(STEPS)]
    topo = detect_topology(model, batches[0][0])
    if skeleton:
        init_skeleton_(topo)
    if shard is not None:
        shard(model)
        topo = shard_topology(topo, model)
    opt = cls(model.parameters(), topology=topo, **hp)
    opt.host_reads = host_reads
    for x, y in batches:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    out: dict[str, Any] = {k: int(v) for k, v in opt.counters().items()}
    out["bytes"] = opt.comm_bytes_per_step
    with torch.no_grad():
        for pname, p in model.named_parameters():
            out[pname] = _full(p).clone()
            for key, value in opt.state.get(p, {}).items():
                out[f"{pname}.{key}"] = _full(value).clone()
    return out


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main(out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    try:
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        results: dict[str, Any] = {}
        for name, (*_, separate) in CASES.items():

            def shard(model: nn.Module, separate: bool = separate) -> None:
                if separate:  # each chain layer its own FSDP unit
                    for m in model:
                        if isinstance(m, (nn.Linear, nn.Conv2d)):
                            fully_shard(m, mesh=mesh)
                fully_shard(model, mesh=mesh)

            results[name] = run_case(name, shard)
            # the synchronization-free form (what accelerators run) on the same numbers
            results[name + "/no_host_reads"] = run_case(name, shard, host_reads=False)
        results["bytes_wide"] = _bytes(mesh, fully_shard, n_in=600)
        results["bytes_narrow"] = _bytes(mesh, fully_shard, n_in=6)
        results["skip"] = _skip_on_one_rank(mesh, fully_shard)
        if dist.get_rank() == 0:
            torch.save(results, os.path.join(out, "result.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _bytes(mesh: Any, fully_shard: Any, n_in: int) -> int:
    """Bytes one step communicates for the MLP with ``n_in`` inputs (m grows with n_in, H does not)."""
    torch.manual_seed(0)
    model = mlp(n_in)
    topo = detect_topology(model, torch.randn(4, n_in))
    fully_shard(model, mesh=mesh)
    opt = GAdam(model.parameters(), lr=0.01, amsgrad=True, topology=shard_topology(topo, model))
    model(torch.randn(4, n_in)).sum().backward()
    opt.step()
    return opt.comm_bytes_per_step


def _skip_on_one_rank(mesh: Any, fully_shard: Any) -> list[int]:
    """A NaN in one rank's rows skips the step on every rank: ``[skipped, steps, weights and state unchanged]``."""
    import torch.distributed as dist

    torch.manual_seed(0)
    model = mlp()
    topo = detect_topology(model, torch.randn(4, 6))
    fully_shard(model, mesh=mesh)
    opt = GAdam(model.parameters(), lr=0.01, topology=shard_topology(topo, model))
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    model(torch.randn(4, 6)).sum().backward()
    before = [t.to_local().clone() for p in model.parameters() for t in (p, *opt.state[p].values()) if t.dim()]
    if dist.get_rank() == 1:  # holds rows of layer 2 with 2 and with 4 ranks
        model[2].weight.grad.to_local().fill_(float("nan"))  # a hidden layer: seen only through the row sums
    opt.step()
    after = [t.to_local() for p in model.parameters() for t in (p, *opt.state[p].values()) if t.dim()]
    same = all(torch.equal(b, a) for b, a in zip(before, after))
    return [int(opt.skipped_steps), int(opt.steps), int(same)]


if __name__ == "__main__":
    main(sys.argv[1])
