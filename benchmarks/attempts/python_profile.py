"""Log entry 12: cProfile of 200 eager GSGD steps on the 4-conv CNN (momentum 0.9, wd 5e-4), one thread. Usage::

PYTHONPATH=$PWD python benchmarks/attempts/python_profile.py
"""

import cProfile
import pstats

import torch

from benchmarks._common import build, fixed_grads
from lightning_gsgd import GSGD, detect_topology

torch.set_num_threads(1)

model, topo, x, y = build("cnn 4x conv64 16x16")
grads = fixed_grads(model, x, y)
for p, g in zip(model.parameters(), grads):
    p.grad = g.clone()
opt = GSGD(model.parameters(), lr=1e-6, momentum=0.9, weight_decay=5e-4, topology=detect_topology(model, x))
for _ in range(5):
    opt.step()
pr = cProfile.Profile()
pr.enable()
for _ in range(200):
    opt.step()
pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(25)
