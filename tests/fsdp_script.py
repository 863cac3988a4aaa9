"""G-SGD on models sharded by ``fully_shard`` (FSDP2), one process per rank on CPU/gloo.

Run by tests/test_fsdp.py, one process per rank:
``RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/fsdp_script.py OUT``.
Rank 0 writes ``OUT/result.pt``: per case the gathered weights and momentum buffers after
:data:`STEPS` steps, the step counters and the bytes communicated per step. The test runs the same
cases unsharded in one process (:func:`run_case` with ``shard=None``) and compares.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_gsgd import GSGD, PathDiagnostics, detect_topology, init_skeleton_, shard_topology
from lightning_gsgd.topology.types import TopologyError

STEPS = 10
#: Steps on which the path diagnostics are measured (before and after the step), per-chain keys included.
DIAG_STEPS = (0, 4, 9)


def mlp(n_in: int = 6) -> nn.Module:
    """Biases, uneven widths (7, 5 and 3 rows do not divide by 2 or 4; rank 3 of 4 holds no row of 5 or 3)."""
    return nn.Sequential(nn.Linear(n_in, 7), nn.ReLU(), nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3))


def cnn() -> nn.Module:
    """Convs, pooling and a flatten into a Linear; no bias on the first conv."""
    return nn.Sequential(
        nn.Conv2d(2, 5, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(5, 6, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 2 * 2, 3),
    )


#: name: (model factory, input shape, GSGD hyper-parameters, skeleton init, wrap every layer separately)
CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], dict[str, Any], bool, bool]] = {
    "mlp": (mlp, (8, 6), {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}, True, True),
    "cnn": (cnn, (8, 2, 8, 8), {"lr": 0.02, "momentum": 0.9, "weight_decay": 1e-3, "nesterov": True}, False, False),
    "plain": (mlp, (8, 6), {"lr": 0.05, "weight_decay": 1e-3}, True, False),
}


def run_case(name: str, shard: Callable[[nn.Module], None] | None) -> dict[str, Any]:
    """Build, (shard,) and train case ``name`` for :data:`STEPS` steps; every rank sees the same batches.

    Returns:
        The full weights and momentum buffers by parameter name, the counters and the bytes per step.
    """
    factory, shape, hp, skeleton, _ = CASES[name]
    torch.manual_seed(0)
    model = factory()
    batches = [(torch.randn(shape), torch.randn(shape[0], 3)) for _ in range(STEPS)]
    topo = detect_topology(model, batches[0][0])
    if skeleton:
        init_skeleton_(topo)
    if shard is not None:
        shard(model)
        topo = shard_topology(topo, model)
    opt = GSGD(model.parameters(), topology=topo, **hp)
    diag = PathDiagnostics(topo, per_chain=True)
    logged: list[dict[str, float]] = []
    for k, (x, y) in enumerate(batches):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        metrics = diag.before_step() if k in DIAG_STEPS else None
        opt.step()
        if metrics is not None:
            metrics.update(diag.after_step(opt))
            logged.append({key: float(v) for key, v in metrics.items()})
    out: dict[str, Any] = {"steps": int(opt.steps), "skipped": int(opt.skipped_steps), "diag": logged}
    out["bytes"] = opt.comm_bytes_per_step
    with torch.no_grad():
        for pname, p in model.named_parameters():
            out[pname] = _full(p).clone()
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                out[pname + ".buf"] = _full(buf).clone()
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
            every: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(every, results[name]["diag"])
            results[name]["diag_ranks"] = every
        results["bytes_wide"] = _bytes(mesh, fully_shard, n_in=600)
        results["bytes_narrow"] = _bytes(mesh, fully_shard, n_in=6)
        results["refused"] = _detect_on_sharded(mesh, fully_shard)
        results["skip"] = _skip_on_one_rank(mesh, fully_shard)
        results["optimizers_refused"] = _optimizers_refused(mesh, fully_shard)
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
    opt = GSGD(model.parameters(), lr=0.01, momentum=0.9, topology=shard_topology(topo, model))
    model(torch.randn(4, n_in)).sum().backward()
    opt.step()
    return opt.comm_bytes_per_step


def _detect_on_sharded(mesh: Any, fully_shard: Any) -> str:
    model = mlp()
    fully_shard(model, mesh=mesh)
    try:
        detect_topology(model, torch.randn(4, 6))
    except TopologyError as err:
        return str(err)
    return ""


def _optimizers_refused(mesh: Any, fully_shard: Any) -> list[str]:
    """The messages of GSGD(compiled=True) and of a stale (unsharded) topology on a sharded model (GAdam on
    sharded weights: tests/test_fsdp_adam.py)."""
    model = mlp()
    stale = detect_topology(model, torch.randn(4, 6))
    fully_shard(model, mesh=mesh)
    topo = shard_topology(stale, model)
    messages = []
    for make in (
        lambda: GSGD(model.parameters(), lr=0.1, topology=topo, compiled=True),
        lambda: GSGD(model.parameters(), lr=0.1, topology=stale),
    ):
        try:
            make()
            messages.append("")
        except TopologyError as err:
            messages.append(str(err))
    return messages


def _skip_on_one_rank(mesh: Any, fully_shard: Any) -> list[int]:
    """A NaN in one rank's rows skips the step on every rank: ``[skipped, weights unchanged]``."""
    import torch.distributed as dist

    torch.manual_seed(0)
    model = mlp()
    topo = detect_topology(model, torch.randn(4, 6))
    fully_shard(model, mesh=mesh)
    opt = GSGD(model.parameters(), lr=0.01, momentum=0.9, topology=shard_topology(topo, model))
    model(torch.randn(4, 6)).sum().backward()
    before = [p.to_local().clone() for p in model.parameters()]
    if dist.get_rank() == dist.get_world_size() - 1:
        model[0].weight.grad.to_local().fill_(float("nan"))
    opt.step()
    same = all(torch.equal(b, p.to_local()) for b, p in zip(before, model.parameters()))
    return [int(opt.skipped_steps), int(same)]


if __name__ == "__main__":
    main(sys.argv[1])
