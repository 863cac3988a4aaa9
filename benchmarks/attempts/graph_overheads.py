"""Log entries 13 and 14: where the time of a ``GSGD(compiled=True)`` step goes, one thread. Usage::

PYTHONPATH=$PWD python benchmarks/attempts/graph_overheads.py ["cnn 4x conv64 16x16"]

Prints the median time (warm: the same step over and over, so lower than in the interleaved
``step_bench.py``) of: the whole step; the compiled step called directly with the arguments the
optimizer replays (so the difference is the optimizer's Python, torch's ``Optimizer.step`` wrapper
included); Inductor's compiled graph called with its flat inputs (so the difference to the previous
is Dynamo's frame handling and the AOT runtime wrapper); and torch's SGD step. Then a
torch.profiler table of the compiled step with Inductor's kernel profiling on, which separates the
generated C++ kernel from the Inductor wrapper code around it.
"""

import statistics
import sys
import time

import torch
from torch._inductor.output_code import CompiledFxGraph
from torch.profiler import profile

import lightning_gsgd.step.graph as CG
from benchmarks._common import build, fixed_grads
from lightning_gsgd import GSGD

torch.set_num_threads(1)
model, topo, x, y = build(sys.argv[1] if len(sys.argv) > 1 else "cnn 4x conv64 16x16")
for p, g in zip(model.parameters(), fixed_grads(model, x, y)):
    p.grad = g.clone()
opt = GSGD(model.parameters(), lr=1e-6, momentum=0.9, weight_decay=5e-4, topology=topo, compiled=True)
opt._graphs = CG.ChainGraphs(options={"cpp.enable_kernel_profile": True})
opt.step()  # compiles; makes the momentum buffers
opt.step()  # builds the replay
r = opt._replay
assert r is not None, "the step was not replayable"
grads = [p.grad for p in r.params]
counters = opt._counters.all_on(r.device)
args = (
    r.chains,
    r.ws,
    [[grads[i] for i in at] for at in r.g_at],
    r.bufs,
    r.bws,
    [[None if i < 0 else grads[i] for i in at] for at in r.bg_at],
    r.bbufs,
    r.hps,
    (r.ps, [grads[i] for i in r.pg_at], r.pbufs, r.ptab),
    counters,
)
captured = {}
original = CompiledFxGraph.__call__


def capture(self, inputs):
    captured["graph"], captured["inputs"] = self, list(inputs)
    return original(self, inputs)


CompiledFxGraph.__call__ = capture
opt.step()
CompiledFxGraph.__call__ = original
graph, inputs = captured["graph"], captured["inputs"]
sgd = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9, weight_decay=5e-4)
sgd.step()


def median_us(f, n=2000):
    for _ in range(20):
        f()
    xs = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        xs.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(xs)


with torch.no_grad():
    for _ in range(2):
        print(
            f"step {median_us(opt.step):.0f} us | compiled step called directly {median_us(lambda: r.fn(*args)):.0f} | "
            f"Inductor graph on its flat inputs {median_us(lambda: graph(list(inputs))):.0f} | "
            f"torch SGD {median_us(sgd.step):.0f}"
        )
with profile() as prof:
    for _ in range(50):
        opt.step()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
