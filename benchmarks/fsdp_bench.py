"""Step time of GSGD (or GAdam) on ``fully_shard``-ed (FSDP2) weights, 2 gloo processes on CPU, and the bytes
it exchanges.

Usage::

    PYTHONPATH=$PWD python benchmarks/fsdp_bench.py [--world 2] [--reps 40] [--warmup 5] [--threads 1]
    PYTHONPATH=$PWD python benchmarks/fsdp_bench.py --optimizer adam    # GAdam/GAdamW vs torch's Adam/AdamW

Launches ``--world`` processes of itself (gloo on 127.0.0.1). On every rank, per model and config,
four optimizers step on the same skeleton-initialized weights and the same fixed gradients:

- ``GSGD sharded``: the model after ``fully_shard`` (each Linear its own unit, then the whole model),
  the topology re-pointed by ``shard_topology``; one ``all_gather`` of O(H) numbers per step;
- ``SGD sharded``: ``torch.optim.SGD`` (foreach) on a second sharded copy (no communication);
- ``GSGD unsharded`` and ``SGD unsharded``: a whole copy of the model in the same process (what one
  process would do alone; every rank times its own copy, so both processes are busy as when sharded).

Rounds are interleaved (rotating start) with a barrier before every timed step, so the ranks start
each step together; the times are per rank (rank 0 and the slowest rank's median are printed), the
ratios paired medians within a round on rank 0. ``bytes/step`` is ``GSGD.comm_bytes_per_step`` (what
each rank receives from the all-gather); ``param bytes`` is the model's parameters (what gathering the
weights, an O(m) exchange, would move).

``--optimizer adam``: the same four columns with ``GAdamW`` (weight decay 1e-2) / ``GAdam`` (amsgrad) in
place of GSGD and torch's ``AdamW`` / ``Adam`` (foreach) in place of SGD (:data:`ADAM_CONFIGS`).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._common import MODELS, fixed_grads, header, median, paired_ratio  # noqa: E402
from lightning_gsgd import GSGD, GAdam, GAdamW, detect_topology, init_skeleton_, shard_topology  # noqa: E402

CONFIGS = {
    "momentum 0.9, wd 5e-4": dict(momentum=0.9, weight_decay=5e-4),
    "plain (no momentum, no wd)": dict(momentum=0.0, weight_decay=0.0),
}
#: name: (G-space optimizer, torch's optimizer, hyper-parameters of both)
ADAM_CONFIGS = {
    "AdamW, wd 1e-2": (GAdamW, torch.optim.AdamW, dict(weight_decay=1e-2)),
    "Adam, amsgrad": (GAdam, torch.optim.Adam, dict(amsgrad=True)),
}
LR = 1e-6  # as step_bench.py: fixed gradients for ~50 steps stay in the regime being timed
BIG = "mlp 784-1024x3-10"
SMALL = "mlp 784-256-256-10"
NAMES = ("gsgd_sharded", "sgd_sharded", "gsgd_unsharded", "sgd_unsharded")


def small_mlp() -> nn.Sequential:
    """MLP 784-256-256-10 (0.27M parameters)."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


BENCH = {BIG: MODELS[BIG], SMALL: (small_mlp, (128, 1, 28, 28))}


def _build(name: str):
    factory, shape = BENCH[name]
    torch.manual_seed(0)
    model = factory()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g)
    y = torch.randint(0, 10, (shape[0],), generator=g)
    topo = detect_topology(model, x)
    init_skeleton_(topo)
    return model, topo, x, y


def _shard(model: nn.Module, mesh) -> None:
    from torch.distributed.fsdp import fully_shard

    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _with_grads(model: nn.Module, grads: list[torch.Tensor]) -> None:
    from torch.distributed.tensor import distribute_tensor

    for p, g in zip(model.parameters(), grads):
        if hasattr(p, "device_mesh"):
            p.grad = distribute_tensor(g.clone(), p.device_mesh, p.placements)
        else:
            p.grad = g.clone()


def _optimizers(name: str, config: tuple, mesh):
    """The four step callables of one row, their G-space optimizers, and the model's parameter bytes.

    ``config``: ``(G-space class, torch class, hyper-parameters)``.
    """
    g_cls, t_cls, hyper = config
    fns, gsgd = {}, {}
    for opt_name in NAMES:
        model, topo, x, y = _build(name)
        grads = fixed_grads(model, x, y)
        if opt_name.endswith("_sharded"):
            _shard(model, mesh)
            topo = shard_topology(topo, model)
        _with_grads(model, grads)
        if opt_name.startswith("gsgd"):
            opt = g_cls(model.parameters(), lr=LR, topology=topo, **hyper)
            gsgd[opt_name] = opt
        else:
            opt = t_cls(model.parameters(), lr=LR, foreach=True, **hyper)
        fns[opt_name] = opt.step
    param_bytes = sum(g.numel() * g.element_size() for g in grads)
    return fns, gsgd, param_bytes


def _timed(fns: dict, reps: int, warmup: int) -> dict[str, list[float]]:
    import torch.distributed as dist

    out: dict[str, list[float]] = {n: [] for n in fns}
    names = list(fns)
    for r in range(warmup + reps):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            dist.barrier()
            t0 = time.perf_counter()
            fns[n]()
            dt = time.perf_counter() - t0
            if r >= warmup:
                out[n].append(dt)
    return out


def _valid(opt: GSGD | GAdam) -> str:
    bad = [f"{int(getattr(opt, k))} {k}" for k in ("skipped_steps", "guard_hits") if int(getattr(opt, k))]
    return ", ".join(bad) or "ok"


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    adam = args.optimizer == "adam"
    g, t = ("GAdam", "Adam") if adam else ("GSGD", "SGD")
    configs = ADAM_CONFIGS if adam else {k: (GSGD, torch.optim.SGD, h) for k, h in CONFIGS.items()}
    try:
        mesh = init_device_mesh("cpu", (world,))
        if rank == 0:
            print(
                header(
                    f"{g} step under fully_shard, {world} gloo processes, cpu float32, "
                    f"median of {args.reps} after {args.warmup} warm-up"
                )
            )
            print(
                f"| model | config | {g} sharded ms (rank 0 / slowest) | {t} sharded ms | {g} unsharded ms "
                f"| {t} unsharded ms | {g} sharded / {t} sharded | {g} sharded / {g} unsharded "
                "| bytes/step | param bytes | bytes/step / param bytes | valid |\n"
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
                flush=True,
            )
        for name in args.models:
            for cname, config in configs.items():
                fns, gsgd, param_bytes = _optimizers(name, config, mesh)
                t = _timed(fns, args.reps, args.warmup)
                meds = torch.tensor([median(t[n]) for n in NAMES], dtype=torch.float64)
                everyone = [torch.zeros_like(meds) for _ in range(world)]
                dist.all_gather(everyone, meds)
                slowest = torch.stack(everyone).max(dim=0).values
                nbytes = gsgd["gsgd_sharded"].comm_bytes_per_step
                valid = {_valid(o) for o in gsgd.values()}
                if rank == 0:
                    ms = [f"{1e3 * meds[i]:.3f} / {1e3 * slowest[i]:.3f}" for i in range(len(NAMES))]
                    print(
                        f"| {name} | {cname} | {' | '.join(ms)} | "
                        f"**{paired_ratio(t['gsgd_sharded'], t['sgd_sharded']):.2f}** | "
                        f"{paired_ratio(t['gsgd_sharded'], t['gsgd_unsharded']):.2f} | "
                        f"{nbytes} | {param_bytes} | {nbytes / param_bytes:.2e} | "
                        f"{'ok' if valid == {'ok'} else ' / '.join(sorted(valid))} |",
                        flush=True,
                    )
        if rank == 0:
            print(f"loadavg after: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    finally:
        dist.destroy_process_group()


def launch(args: argparse.Namespace, argv: list[str]) -> int:
    """Start ``args.world`` processes of this script; returns the first non-zero exit code, else 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(args.world))
    env["OMP_NUM_THREADS"] = str(args.threads)
    procs = [
        subprocess.Popen([sys.executable, __file__, *argv], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
        for r in range(args.world)
    ]
    codes = [p.wait() for p in procs]
    return next((c for c in codes if c), 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd", help="GSGD vs SGD, or GAdam vs Adam")
    ap.add_argument("--models", nargs="*", default=[BIG, SMALL], choices=list(BENCH))
    args = ap.parse_args()
    if "RANK" in os.environ:
        worker(args)
    else:
        sys.exit(launch(args, sys.argv[1:]))


if __name__ == "__main__":
    main()
