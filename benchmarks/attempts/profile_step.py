"""Log entry 12: torch.profiler table of 10 GSGD steps (momentum as given; weight decay 5e-4 with
momentum, else 0), one thread. Usage::

PYTHONPATH=$PWD python benchmarks/attempts/profile_step.py "mlp 784-1024x3-10" COMPILED(0|1) MOMENTUM
"""

import sys

import torch
from torch.profiler import profile

from benchmarks._common import build, fixed_grads
from lightning_gsgd import GSGD, detect_topology

torch.set_num_threads(1)

name = sys.argv[1]
model, topo, x, y = build(name)
grads = fixed_grads(model, x, y)
for p, g in zip(model.parameters(), grads):
    p.grad = g.clone()
opt = GSGD(
    model.parameters(),
    lr=1e-6,
    momentum=float(sys.argv[3]),
    weight_decay=5e-4 if float(sys.argv[3]) else 0.0,
    topology=detect_topology(model, x),
    compiled=sys.argv[2] == "1",
)
for _ in range(5):
    opt.step()
with profile() as prof:
    for _ in range(10):
        opt.step()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
