"""First-step compile time of the default step (``GSGD(compiled=None)``), with an empty and with a warm
Inductor cache.

Each model runs in two fresh processes that share a new, empty ``TORCHINDUCTOR_CACHE_DIR``: the first
finds nothing cached (what a first run on a new machine pays), the second finds the first's kernels
(what every later run pays: Dynamo still traces the step). The time is GSGD's own
``compile_seconds``, the first step's wall time (compiling, then running it), which GSGD logs. Also
printed: which form the default picked and, for the compiled form, the Inductor wrapper.

    PYTHONPATH=$PWD python benchmarks/compile_bench.py [--models "cnn 4x conv64 16x16" ...] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

_CHILD = r"""
import json, sys, torch
from benchmarks._common import build, fixed_grads
from lightning_gsgd import GSGD
torch.set_num_threads(int(sys.argv[2]))
model, topo, x, y = build(sys.argv[1])
for p, g in zip(model.parameters(), fixed_grads(model, x, y)):
    p.grad = g
opt = GSGD(model.parameters(), lr=1e-6, momentum=0.9, weight_decay=5e-4, topology=topo)
opt.step()
entries = [] if opt._graphs is None else list(opt._graphs.compiled.values())
print(json.dumps({
    "compiled": opt.compiled,
    "seconds": entries[0][0].compile_seconds if entries else None,
    "what": entries[0][0].what if entries else "eager",
    "params": sum(p.numel() for p in topo.chain_params()),
}))
"""


def _run(model: str, threads: int, cache: str) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "PYTHONPATH": os.getcwd()}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, model, str(threads)], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    sys.path.insert(0, os.getcwd())
    from benchmarks._common import MODELS, header

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp 784-1024x3-10", "cnn 4x conv64 16x16"], choices=MODELS)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    print(header("first-step compile time of the default step (compiled=None), cpu float32"))
    print("| model | chain params | form | empty cache s | warm cache s |")
    print("|---|---:|---|---:|---:|")
    for model in args.models:
        with tempfile.TemporaryDirectory() as cache:
            cold = _run(model, args.threads, cache)
            warm = _run(model, args.threads, cache)
        form = cold["what"] if cold["compiled"] else "eager"
        fmt = lambda r: "-" if r["seconds"] is None else f"{r['seconds']:.1f}"  # noqa: E731
        print(f"| {model} | {cold['params']:,} | {form} | {fmt(cold)} | {fmt(warm)} |")
    print("loadavg after: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
