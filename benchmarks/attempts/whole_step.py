"""Log entry 12: the whole GSGD.step (synchronization-free path) under torch.compile vs eager GSGD vs
torch SGD, one thread, with a profile. Usage, from the repository root::

    PYTHONPATH=$PWD python benchmarks/attempts/whole_step.py "cnn 4x conv64 16x16" ['{"cpp_wrapper": True}']

(the optional second argument: Inductor options, a Python literal).
"""

import ast
import copy
import statistics
import sys
import time

import torch
from torch.profiler import profile

from benchmarks._common import build, fixed_grads
from lightning_gsgd import GSGD, detect_topology

torch.set_num_threads(1)

name = sys.argv[1]
opts = ast.literal_eval(sys.argv[2]) if len(sys.argv) > 2 else {}
model, topo, x, y = build(name)
grads = fixed_grads(model, x, y)


def mk(kind):
    m = copy.deepcopy(model)
    for p, g in zip(m.parameters(), grads):
        p.grad = g.clone()
    if kind == "sgd":
        return m, torch.optim.SGD(m.parameters(), lr=1e-6, momentum=0.9, weight_decay=5e-4, foreach=False)
    return m, GSGD(m.parameters(), lr=1e-6, momentum=0.9, weight_decay=5e-4, topology=detect_topology(m, x))


m1, eager = mk("g")
m2, comp = mk("g")
m3, sgd = mk("sgd")
comp._host_reads = False
comp.step()
eager.step()
step = torch.compile(comp.step, options=opts) if opts else torch.compile(comp.step)
t0 = time.perf_counter()
step()
print("compile %.1f s" % (time.perf_counter() - t0))
eager.step()
ts = {"eager": [], "comp": [], "sgd": []}
fns = {"eager": eager.step, "comp": step, "sgd": sgd.step}
for _ in range(60):
    for k, f in fns.items():
        t0 = time.perf_counter()
        f()
        ts[k].append(time.perf_counter() - t0)
for k in ts:
    print(k, "%.3f ms" % (1e3 * statistics.median(ts[k][10:])))
with profile() as prof:
    for _ in range(10):
        step()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
