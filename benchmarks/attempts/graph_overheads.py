"""Log entry 13: where the time of a ``GSGD(compiled=True)`` step goes, one thread. Usage::

PYTHONPATH=$PWD python benchmarks/attempts/graph_overheads.py ["cnn 4x conv64 16x16"]

Prints the median time of: the whole step; the compiled graph called directly with the step's own
arguments (so the difference is the optimizer's Python around it); the same graph compiled through
Dynamo's experimental ``aot_compile`` with its guard check disabled (Dynamo's per-call frame
handling skipped; not adopted: no guards at all, an experimental API); and torch's SGD step. Then a
torch.profiler table of the compiled step with Inductor's kernel profiling on, which separates the
generated C++ kernel from the wrapper code around it.
"""

import statistics
import sys
import time

import torch
from torch.profiler import profile

import lightning_gsgd.chain_graph as CG
from benchmarks._common import build, fixed_grads
from lightning_gsgd import GSGD

torch.set_num_threads(1)
model, topo, x, y = build(sys.argv[1] if len(sys.argv) > 1 else "cnn 4x conv64 16x16")
for p, g in zip(model.parameters(), fixed_grads(model, x, y)):
    p.grad = g.clone()
opt = GSGD(model.parameters(), lr=1e-6, momentum=0.9, weight_decay=5e-4, topology=topo, compiled=True)
opt._graphs = CG.ChainGraphs(options={"cpp.enable_kernel_profile": True})
opt.step()

captured = {}
original = CG.ChainGraphs.step


def capture(self, *args):
    captured["args"] = args
    return original(self, *args)


CG.ChainGraphs.step = capture
opt.step()
CG.ChainGraphs.step = original
args = captured["args"]
((compiled, _),) = opt._graphs.compiled.values()
with torch.no_grad():
    aot = torch.compile(CG._own_copy(CG._step), fullgraph=True, dynamic=False).aot_compile((args, {}))
    aot.disable_guard_check()
sgd = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9, weight_decay=5e-4)
sgd.step()


def median_ms(f, n=400):
    for _ in range(5):
        f()
    xs = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        xs.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(xs)


with torch.no_grad():
    for _ in range(2):
        print(
            f"step {median_ms(opt.step):.3f} ms | compiled graph alone {median_ms(lambda: compiled(*args)):.3f} | "
            f"aot_compile, no guard check {median_ms(lambda: aot(*args)):.3f} | torch SGD {median_ms(sgd.step):.3f}"
        )
with profile() as prof:
    for _ in range(50):
        opt.step()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))
